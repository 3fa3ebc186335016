package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lib/pq"
	"golang.org/x/net/websocket"
)

// ---------------------------------------------------------------------------
// Test harness: a Service behind httptest, fed by a fake listener.

// fakeListener stands in for pq.Listener: tests push notifications with notify.
type fakeListener struct {
	ch       chan *pq.Notification
	mu       sync.Mutex
	channels []string // LISTENed, in order; guarded by mu
	closed   bool     // guarded by mu
	pingHang chan struct{}
	resets   atomic.Int32
}

func newFakeListener() *fakeListener {
	return &fakeListener{ch: make(chan *pq.Notification, 32)}
}

func (f *fakeListener) Listen(channel string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.channels = append(f.channels, channel)
	return nil
}

func (f *fakeListener) NotificationChannel() <-chan *pq.Notification { return f.ch }

func (f *fakeListener) Ping() error {
	if f.pingHang != nil {
		<-f.pingHang
	}
	return nil
}

func (f *fakeListener) Reset() { f.resets.Add(1) }

func (f *fakeListener) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.closed {
		f.closed = true
		close(f.ch)
	}
	return nil
}

// notify delivers one NOTIFY as pq would.
func (f *fakeListener) notify(channel, payload string) {
	f.ch <- &pq.Notification{Channel: channel, Extra: payload}
}

// harness is a running Service with a fake listener behind an httptest server.
type harness struct {
	t   testing.TB
	svc *Service
	l   *fakeListener
	srv *httptest.Server
}

// testConfig is the default configuration with timings suited to tests.
func testConfig() Config {
	cfg := defaultConfig()
	cfg.Notifier.PingInterval = time.Minute
	cfg.Notifier.ShutdownTimeout = 5 * time.Second
	return cfg
}

// newHarness starts a Service; mutate (may be nil) adjusts the configuration.
// The listener reports "connected" at once, as pq does on its first connection.
func newHarness(t testing.TB, mutate func(*Config)) *harness {
	t.Helper()
	cfg := testConfig()
	if mutate != nil {
		mutate(&cfg)
	}
	svc := newService(cfg, slog.New(slog.DiscardHandler))
	l := newFakeListener()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); svc.runListener(ctx, l) }()
	svc.onListenerEvent(pq.ListenerEventConnected, nil)

	srv := httptest.NewUnstartedServer(nil)
	srv.Config = svc.httpServer()
	srv.Listener = trackingListener{srv.Listener}
	srv.Start()
	h := &harness{t: t, svc: svc, l: l, srv: srv}
	t.Cleanup(func() {
		svc.hub.closeAll(1001, "test over")
		ctx2, cancel2 := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel2()
		if err := svc.hub.wait(ctx2); err != nil {
			svc.hub.forceClose()
		}
		srv.Close()
		cancel()
		l.Close()
		<-done
	})
	waitFor(t, "LISTEN on every channel", func() bool { return svc.listening.Load() })
	return h
}

func (h *harness) wsURL() string { return "ws" + strings.TrimPrefix(h.srv.URL, "http") + "/ws" }

// waitFor polls cond until it holds, failing the test after 10 seconds.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// wsClient is a minimal WebSocket client speaking raw frames, so that tests
// can see close codes, omit Origin, stop reading or reset the connection.
type wsClient struct {
	t    testing.TB
	conn net.Conn
	br   *bufio.Reader
	id   string // client_id from the welcome frame
}

// dialRaw performs the WebSocket handshake with the given extra headers and
// returns the client and the HTTP status of the handshake response.
func dialRaw(t testing.TB, url string, header http.Header) (*wsClient, *http.Response) {
	t.Helper()
	u := strings.TrimPrefix(url, "ws://")
	host, path, _ := strings.Cut(u, "/")
	conn, err := net.Dial("tcp", host)
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	t.Cleanup(func() { conn.Close() })
	req, _ := http.NewRequest("GET", "http://"+host+"/"+path, nil)
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
	req.Header.Set("Sec-WebSocket-Version", "13")
	for k, v := range header {
		req.Header[k] = v
	}
	if err := req.Write(conn); err != nil {
		t.Fatalf("handshake: %v", err)
	}
	br := bufio.NewReader(conn)
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		t.Fatalf("handshake response: %v", err)
	}
	return &wsClient{t: t, conn: conn, br: br}, resp
}

// dial connects to url (with an Origin header, as browsers send) and reads the welcome frame.
func dial(t testing.TB, url string) *wsClient {
	t.Helper()
	c, resp := dialRaw(t, url, http.Header{"Origin": {"http://localhost"}})
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("handshake status %d, want 101", resp.StatusCode)
	}
	welcome := c.read()
	if welcome["type"] != "welcome" {
		t.Fatalf("first frame = %v, want a welcome", welcome)
	}
	c.id, _ = welcome["client_id"].(string)
	return c
}

// writeFrame sends one masked frame.
func (c *wsClient) writeFrame(opcode byte, payload []byte) error {
	hdr := []byte{0x80 | opcode}
	switch n := len(payload); {
	case n <= 125:
		hdr = append(hdr, 0x80|byte(n))
	case n < 65536:
		hdr = append(hdr, 0x80|126, byte(n>>8), byte(n))
	default:
		hdr = append(hdr, 0x80|127)
		hdr = binary.BigEndian.AppendUint64(hdr, uint64(n))
	}
	mask := []byte{1, 2, 3, 4}
	hdr = append(hdr, mask...)
	masked := make([]byte, len(payload))
	for i, b := range payload {
		masked[i] = b ^ mask[i%4]
	}
	c.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, err := c.conn.Write(append(hdr, masked...))
	return err
}

// readFrame returns the next frame, answering pings as a browser would.
func (c *wsClient) readFrame(timeout time.Duration) (opcode byte, payload []byte, err error) {
	c.conn.SetReadDeadline(time.Now().Add(timeout))
	for {
		var h [2]byte
		if _, err = io.ReadFull(c.br, h[:]); err != nil {
			return 0, nil, err
		}
		n := uint64(h[1] & 0x7f)
		switch n {
		case 126:
			var b [2]byte
			if _, err = io.ReadFull(c.br, b[:]); err != nil {
				return 0, nil, err
			}
			n = uint64(binary.BigEndian.Uint16(b[:]))
		case 127:
			var b [8]byte
			if _, err = io.ReadFull(c.br, b[:]); err != nil {
				return 0, nil, err
			}
			n = binary.BigEndian.Uint64(b[:])
		}
		payload = make([]byte, n)
		if _, err = io.ReadFull(c.br, payload); err != nil {
			return 0, nil, err
		}
		opcode = h[0] & 0x0f
		if opcode == websocket.PingFrame {
			c.writeFrame(websocket.PongFrame, payload)
			continue
		}
		return opcode, payload, nil
	}
}

// send writes v as a JSON text frame (a string is sent as is).
func (c *wsClient) send(v any) {
	c.t.Helper()
	data, ok := v.(string)
	if !ok {
		b, _ := json.Marshal(v)
		data = string(b)
	}
	if err := c.writeFrame(websocket.TextFrame, []byte(data)); err != nil {
		c.t.Fatalf("send: %v", err)
	}
}

// readRaw returns the next text frame, failing after 5 seconds or on any other frame.
func (c *wsClient) readRaw() string {
	c.t.Helper()
	op, p, err := c.readFrame(5 * time.Second)
	if err != nil {
		c.t.Fatalf("read: %v", err)
	}
	if op != websocket.TextFrame {
		c.t.Fatalf("read: got frame with opcode %d (%q), want text", op, p)
	}
	return string(p)
}

// read returns the next frame decoded as a JSON object.
func (c *wsClient) read() map[string]any {
	c.t.Helper()
	raw := c.readRaw()
	var m map[string]any
	if err := json.Unmarshal([]byte(raw), &m); err != nil {
		c.t.Fatalf("frame %q is not a JSON object: %v", raw, err)
	}
	return m
}

// subscribe subscribes with an id and waits for the acknowledgement, so that
// the subscription is live when it returns.
func (c *wsClient) subscribe(filter string) {
	c.t.Helper()
	c.send(map[string]any{"type": "subscribe", "filter": filter, "id": "sub-" + filter})
	if m := c.read(); m["type"] != "subscribed" || m["filter"] != filter {
		c.t.Fatalf("subscribe %q: got %v, want a subscribed acknowledgement", filter, m)
	}
}

// expectSilence asserts that no frame arrives within d. A timed-out read may
// have consumed part of a frame, so use it last or before a fresh exchange.
func (c *wsClient) expectSilence(d time.Duration) {
	c.t.Helper()
	if op, p, err := c.readFrame(d); err == nil {
		c.t.Fatalf("got unexpected frame (opcode %d) %s", op, p)
	}
}

// closeCode reads until the server's close frame and returns its code and
// reason; code 0 means the connection ended without a close frame.
func (c *wsClient) closeCode() (int, string) {
	c.t.Helper()
	for {
		op, p, err := c.readFrame(10 * time.Second)
		if err != nil {
			return 0, ""
		}
		if op == websocket.CloseFrame {
			if len(p) < 2 {
				return 1005, ""
			}
			return int(binary.BigEndian.Uint16(p)), string(p[2:])
		}
	}
}

func getJSON(t testing.TB, url string) (int, map[string]any) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var m map[string]any
	if err := json.Unmarshal(body, &m); err != nil {
		t.Fatalf("GET %s: body %q is not JSON: %v", url, body, err)
	}
	return resp.StatusCode, m
}

// ---------------------------------------------------------------------------
// Tests

func TestNotificationReachesSubscriber(t *testing.T) {
	h := newHarness(t, nil)
	c := dial(t, h.wsURL())
	c.subscribe("entity_type:execution")
	h.l.notify("execution_status_changed", `{"entity_type":"execution","entity_id":123,"status":"succeeded"}`)
	m := c.read()
	if m["type"] != "notification" || m["notification_type"] != "execution_status_changed" ||
		m["entity_type"] != "execution" || m["entity_id"] != 123.0 || m["user_id"] != nil {
		t.Fatalf("got %v", m)
	}
	if p, _ := m["payload"].(map[string]any); p["status"] != "succeeded" {
		t.Fatalf("payload = %v", m["payload"])
	}
	if ts, _ := m["timestamp"].(string); !strings.HasSuffix(ts, "Z") {
		t.Fatalf("timestamp %q is not UTC", ts)
	}
}
