package main

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http/httptest"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// ---------------------------------------------------------------------------
// Benchmarks (issue 4). The README's Performance section quotes them.

// benchPayload is a realistic Attune trigger payload.
const benchPayload = `{"entity_type":"execution","entity_id":123456,"id":123456,"status":"running","old_status":"scheduled","action_ref":"core.http_request","parent":null,"enforcement":98765,"executor":7,"updated":"2026-12-04T10:30:00.123456+00:00"}`

func BenchmarkParseNotification(b *testing.B) {
	now := time.Now()
	b.ReportAllocs()
	b.SetBytes(int64(len(benchPayload)))
	for b.Loop() {
		if _, err := parseNotification("execution_status_changed", benchPayload, now); err != nil {
			b.Fatal(err)
		}
	}
}

// discardConn is a socket that accepts every write.
type discardConn struct{ net.Conn }

func (discardConn) Write(p []byte) (int, error)      { return len(p), nil }
func (discardConn) SetWriteDeadline(time.Time) error { return nil }
func (discardConn) SetReadDeadline(time.Time) error  { return nil }
func (discardConn) Close() error                     { return nil }

// BenchmarkRoute measures routing one notification among N subscribed clients
// of which exactly one matches: with an index the cost does not grow with N.
func BenchmarkRoute(b *testing.B) {
	for _, n := range []int{10, 1_000, 100_000} {
		b.Run("clients="+strconv.Itoa(n), func(b *testing.B) {
			var stats Stats
			hub := newHub(100, &stats)
			cfg := testConfig().Notifier
			cfg.ClientQueue = 1 << 30 // routing, not the writer, is measured here
			clients := make([]*Client, n)
			for i := range clients {
				c := newClient(nil, &trackedConn{Conn: discardConn{}}, &stats, cfg)
				clients[i] = c
				hub.register(c)
				f, _ := ParseFilter("entity:execution:" + strconv.Itoa(i))
				hub.subscribe(c, f, nil)
			}
			defer func() {
				for _, c := range clients {
					c.closeWith(0, "")
				}
			}()
			payload := strings.Replace(benchPayload, "123456", "7", 1) // entity:execution:7 matches one client
			note, err := parseNotification("execution_status_changed", payload, time.Now())
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				hub.dispatch(note)
			}
			b.StopTimer()
			if stats.SlowConsumers.Load() != 0 {
				b.Fatalf("%d slow consumers: the matching client's queue overflowed", stats.SlowConsumers.Load())
			}
		})
	}
}

// loadgen is a child process (this test binary, see TestLoadgenProcess) that
// holds the benchmark's WebSocket clients, so that the server's CPU, memory
// and scheduling are measured alone, as with real remote clients.
type loadgen struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Reader
}

// loadResult is what the load generator reports when every client has its frames.
type loadResult struct {
	Frames int64   `json:"frames"` // text frames received over all clients
	P50    float64 `json:"p50_ms"` // NOTIFY-to-receipt latency, from each payload's sent_ns
	P99    float64 `json:"p99_ms"`
}

// startLoadgen connects clients to url, each subscribed to "all", and returns
// once all are subscribed. With expect > 0 each client reads expect
// notifications and the generator reports; with 0 they idle until stop.
func startLoadgen(b *testing.B, url string, clients, expect int) *loadgen {
	b.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestLoadgenProcess$")
	cmd.Env = append(os.Environ(), "ATTUNE_LOADGEN_URL="+url,
		"ATTUNE_LOADGEN_CLIENTS="+strconv.Itoa(clients), "ATTUNE_LOADGEN_EXPECT="+strconv.Itoa(expect))
	cmd.Stderr = os.Stderr
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	g := &loadgen{cmd: cmd, stdin: stdin, out: bufio.NewReader(stdout)}
	b.Cleanup(func() { stdin.Close(); cmd.Process.Kill(); cmd.Wait() })
	if line, err := g.out.ReadString('\n'); err != nil || line != "ready\n" {
		b.Fatalf("load generator: %q, %v", line, err)
	}
	return g
}

// result waits for the generator's report.
func (g *loadgen) result(b *testing.B) loadResult {
	b.Helper()
	line, err := g.out.ReadString('\n')
	var r loadResult
	if err == nil {
		err = json.Unmarshal([]byte(line), &r)
	}
	if err != nil {
		b.Fatalf("load generator report %q: %v", line, err)
	}
	return r
}

// stop ends an idle generator; its connections close.
func (g *loadgen) stop() {
	g.stdin.Close()
	g.cmd.Wait()
}

// TestLoadgenProcess is the load generator's main; it only runs as a child of a benchmark.
func TestLoadgenProcess(t *testing.T) {
	url := os.Getenv("ATTUNE_LOADGEN_URL")
	if url == "" {
		t.Skip("only runs as a benchmark's load-generator process")
	}
	clients, _ := strconv.Atoi(os.Getenv("ATTUNE_LOADGEN_CLIENTS"))
	expect, _ := strconv.Atoi(os.Getenv("ATTUNE_LOADGEN_EXPECT"))
	var lim syscall.Rlimit
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	lim.Cur = lim.Max
	syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	conns := make([]*wsClient, clients)
	for i := range conns {
		c, _ := dialRaw(t, url, nil)
		c.read() // welcome
		c.subscribe("all")
		c.conn.SetReadDeadline(time.Time{})
		conns[i] = c
	}
	fmt.Println("ready")
	if expect == 0 {
		io.Copy(io.Discard, os.Stdin)
		return
	}
	lats := make([][]time.Duration, clients)
	var frames atomic.Int64
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lats[i] = readNotifications(c.br, expect, &frames)
		}()
	}
	wg.Wait()
	var all []time.Duration
	for _, l := range lats {
		all = append(all, l...)
	}
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	out, _ := json.Marshal(loadResult{Frames: frames.Load(), P50: ms(percentile(all, 0.50)), P99: ms(percentile(all, 0.99))})
	fmt.Println(string(out))
}

// readNotifications reads n text frames from br, with little CPU, and returns
// the latency of each that carries "sent_ns".
func readNotifications(br *bufio.Reader, n int, frames *atomic.Int64) []time.Duration {
	lats := make([]time.Duration, 0, n)
	buf := make([]byte, 16<<10)
	h := make([]byte, 10)
	for got := 0; got < n; {
		if _, err := io.ReadFull(br, h[:2]); err != nil {
			return lats
		}
		size := int(h[1] & 0x7f)
		switch size {
		case 126:
			io.ReadFull(br, h[2:4])
			size = int(binary.BigEndian.Uint16(h[2:4]))
		case 127:
			io.ReadFull(br, h[2:10])
			size = int(binary.BigEndian.Uint64(h[2:10]))
		}
		if size > len(buf) {
			br.Discard(size)
			continue
		}
		if _, err := io.ReadFull(br, buf[:size]); err != nil {
			return lats
		}
		if h[0]&0x0f != 0x1 { // not a text frame
			continue
		}
		got++
		frames.Add(1)
		if i := bytes.Index(buf[:size], []byte(`"sent_ns"`)); i >= 0 {
			rest := bytes.TrimLeft(buf[i+len(`"sent_ns"`):size], " :") // json_build_object writes "key" : value
			end := bytes.IndexAny(rest, ",}")
			if sent, err := strconv.ParseInt(string(bytes.TrimSpace(rest[:end])), 10, 64); err == nil {
				lats = append(lats, time.Since(time.Unix(0, sent)))
			}
		}
	}
	return lats
}

// waitDrained waits until every client's queue has been written out.
func waitDrained(b *testing.B, h *Hub) {
	waitFor(b, "client queues to drain", func() bool {
		h.mu.Lock()
		defer h.mu.Unlock()
		for c := range h.clients {
			c.mu.Lock()
			busy := c.queue != nil
			c.mu.Unlock()
			if busy {
				return false
			}
		}
		return true
	})
}

// cpuTime is the process's user+system CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkFanout pushes notifications through the service to 1,000 loopback
// WebSocket clients (in a child process) that all match, 100 per burst as a
// PostgreSQL transaction delivers them. cpu-ns/delivery is the server's alone.
func BenchmarkFanout(b *testing.B) {
	const clients, burst = 1000, 100
	h := newHarness(b, nil)
	g := startLoadgen(b, h.wsURL(), clients, b.N)
	runtime.GC()
	var ms0, ms1 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	cpu0 := cpuTime()
	b.ResetTimer()
	start := time.Now()
	for sent := 0; sent < b.N; sent += burst {
		for range min(burst, b.N-sent) {
			h.l.notify("execution_status_changed", benchPayload)
		}
		waitDrained(b, h.svc.hub) // bursts are spaced as commits would be, and no queue overflows
	}
	r := g.result(b)
	elapsed := time.Since(start)
	b.StopTimer()
	cpu := cpuTime() - cpu0
	runtime.ReadMemStats(&ms1)
	deliveries := float64(b.N) * clients
	if r.Frames != int64(deliveries) {
		b.Fatalf("clients received %d of %.0f notifications", r.Frames, deliveries)
	}
	b.ReportMetric(deliveries/elapsed.Seconds(), "deliveries/s")
	b.ReportMetric(float64(cpu.Nanoseconds())/deliveries, "server-cpu-ns/delivery")
	b.ReportMetric(float64(ms1.Mallocs-ms0.Mallocs)/float64(b.N), "allocs/notification")
	b.ReportMetric(float64(ms1.Mallocs-ms0.Mallocs)/deliveries, "allocs/delivery")
}

// benchDB opens the test database, or skips.
func benchDB(b *testing.B) (*sql.DB, string) {
	url := os.Getenv("ATTUNE_TEST_DATABASE_URL")
	if url == "" {
		b.Skip("set ATTUNE_TEST_DATABASE_URL to benchmark against PostgreSQL")
	}
	db, err := sql.Open("postgres", url)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { db.Close() })
	return db, url
}

// benchPGService runs a Service with the real pq listener on channel, behind httptest.
func benchPGService(b *testing.B, url, channel string) (*Service, string) {
	cfg := testConfig()
	cfg.Database.URL = url
	cfg.Notifier.Channels = []string{channel}
	svc := newService(cfg, slog.New(slog.DiscardHandler))
	l := newPGListener(cfg.Database, svc.onListenerEvent)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); svc.runListener(ctx, l) }()
	srv := httptest.NewUnstartedServer(nil)
	srv.Config = svc.httpServer()
	srv.Listener = trackingListener{srv.Listener}
	srv.Start()
	b.Cleanup(func() {
		svc.hub.closeAll(1001, "benchmark over")
		wctx, wcancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer wcancel()
		svc.hub.wait(wctx)
		srv.Close()
		cancel()
		l.Close()
		<-done
	})
	waitFor(b, "the listener", func() bool { return svc.connected.Load() && svc.listening.Load() })
	return svc, "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws"
}

// notifySQL sends n NOTIFYs on channel in one transaction, each payload
// carrying its send time in sent_ns.
const notifySQL = `SELECT pg_notify($1, json_build_object('entity_type','execution','entity_id',i,'id',i,
	'status','running','old_status','scheduled','action_ref','core.http_request',
	'sent_ns', (extract(epoch from clock_timestamp())*1e9)::bigint)::text)
	FROM generate_series(1, $2::int) AS i`

// ingestSQL sends n NOTIFYs on channel in one transaction, built as cheaply as
// PostgreSQL allows so that the sender is not the bottleneck.
const ingestSQL = `SELECT pg_notify($1, '{"entity_type":"execution","entity_id":' || i || ',"id":' || i ||
	',"status":"running","old_status":"scheduled","action_ref":"core.http_request"}') FROM generate_series(1, $2::int) AS i`

func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	return ds[min(len(ds)-1, int(float64(len(ds))*p))]
}

// BenchmarkPGFanout: PostgreSQL -> pq.Listener -> 1,000 WebSocket clients, 500
// notifications sent 100 per transaction (the peer's reference workload) per
// iteration. Run with -benchtime=5x.
func BenchmarkPGFanout(b *testing.B) {
	const clients, total, perTx = 1000, 500, 100
	db, url := benchDB(b)
	channel := "bench_fanout"
	svc, wsURL := benchPGService(b, url, channel)
	g := startLoadgen(b, wsURL, clients, b.N*total)
	cpu0 := cpuTime()
	b.ResetTimer()
	start := time.Now()
	for range b.N {
		for sent := 0; sent < total; sent += perTx {
			if _, err := db.Exec(notifySQL, channel, perTx); err != nil {
				b.Fatal(err)
			}
		}
		waitDrained(b, svc.hub)
	}
	r := g.result(b)
	elapsed := time.Since(start)
	b.StopTimer()
	deliveries := float64(b.N*total) * clients
	b.ReportMetric(deliveries/elapsed.Seconds(), "deliveries/s")
	b.ReportMetric(float64((cpuTime()-cpu0).Nanoseconds())/deliveries, "server-cpu-ns/delivery")
	b.ReportMetric(r.P50, "p50-ms")
	b.ReportMetric(r.P99, "p99-ms")
	if n := svc.stats.SlowConsumers.Load(); n != 0 {
		b.Fatalf("%d slow consumers", n)
	}
}

// BenchmarkPGLatencyPaced: 1,000 clients, 20 notifications/s, one per
// transaction, for 5 s per iteration. Run with -benchtime=1x.
func BenchmarkPGLatencyPaced(b *testing.B) {
	const clients, rate, seconds = 1000, 20, 5
	db, url := benchDB(b)
	channel := "bench_paced"
	_, wsURL := benchPGService(b, url, channel)
	g := startLoadgen(b, wsURL, clients, b.N*rate*seconds)
	cpu0 := cpuTime()
	b.ResetTimer()
	tick := time.NewTicker(time.Second / rate)
	defer tick.Stop()
	for range b.N * rate * seconds {
		<-tick.C
		if _, err := db.Exec(notifySQL, channel, 1); err != nil {
			b.Fatal(err)
		}
	}
	r := g.result(b)
	b.StopTimer()
	b.ReportMetric(float64((cpuTime()-cpu0).Nanoseconds())/float64(r.Frames), "server-cpu-ns/delivery")
	b.ReportMetric(r.P50, "p50-ms")
	b.ReportMetric(r.P99, "p99-ms")
}

// BenchmarkPGIngest: no clients; PostgreSQL sends 1,000 NOTIFYs per
// transaction from two connections and the service must keep up.
func BenchmarkPGIngest(b *testing.B) {
	const perTx, senders = 1000, 2
	db, url := benchDB(b)
	channel := "bench_ingest"
	svc, _ := benchPGService(b, url, channel)
	base := svc.stats.Received.Load()
	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	txs := (b.N + perTx - 1) / perTx
	var next atomic.Int64
	for range senders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(txs) {
				if _, err := db.Exec(ingestSQL, channel, perTx); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	want := base + uint64(txs*perTx)
	waitFor(b, "every NOTIFY", func() bool { return svc.stats.Received.Load() >= want })
	elapsed := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64(txs*perTx)/elapsed.Seconds(), "notify/s")
}

// BenchmarkIdleConnections measures what an idle WebSocket connection costs
// the server: a child process (this test binary) opens them so that only the
// server's side is counted. Run with -benchtime=1x.
func BenchmarkIdleConnections(b *testing.B) {
	const n = 10_000
	var lim syscall.Rlimit
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	if lim.Cur < n+1000 {
		lim.Cur = min(lim.Max, n+1000)
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
		syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
		if lim.Cur < n+1000 {
			b.Skipf("open-file limit %d is too low for %d connections and cannot be raised", lim.Cur, n)
		}
	}
	h := newHarness(b, func(c *Config) { c.Notifier.MaxConnections = n + 10 })
	for range b.N {
		before := settledRSS()
		var m0, m1 runtime.MemStats
		runtime.ReadMemStats(&m0)
		g := startLoadgen(b, h.wsURL(), n, 0)
		time.Sleep(time.Second) // let the writers of the welcome and acknowledgement frames exit
		during := settledRSS()
		runtime.ReadMemStats(&m1)
		g.stop()
		waitFor(b, "every client to leave", func() bool { c, _ := h.svc.hub.counts(); return c == 0 })
		time.Sleep(time.Second)
		after := settledRSS()
		b.ReportMetric(float64(during-before)/n/1024, "KiB-RSS/conn")
		b.ReportMetric(float64(m1.HeapInuse-m0.HeapInuse)/n/1024, "KiB-heap/conn")
		b.ReportMetric(float64(m1.StackInuse-m0.StackInuse)/n/1024, "KiB-stack/conn")
		b.ReportMetric(float64(after-before)/1024/1024, "MiB-RSS-left-after")
		b.Logf("RSS before %d MiB, with %d idle connections %d MiB, after they left %d MiB", before>>20, n, during>>20, after>>20)
	}
}

// settledRSS returns the resident set size after collecting garbage and
// returning free memory to the OS.
func settledRSS() int64 {
	runtime.GC()
	debug.FreeOSMemory()
	data, _ := os.ReadFile("/proc/self/status")
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			var kb int64
			fmt.Sscanf(strings.TrimPrefix(line, "VmRSS:"), "%d", &kb)
			return kb * 1024
		}
	}
	return 0
}
