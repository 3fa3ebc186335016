package main

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
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
	"unicode/utf8"

	"github.com/lib/pq"
	"golang.org/x/net/websocket"
)

// ---------------------------------------------------------------------------
// Test harness: a Service behind httptest, fed by a fake listener.

// fakeListener stands in for pq.Listener: tests push notifications with notify.
type fakeListener struct {
	ch         chan *pq.Notification
	mu         sync.Mutex
	channels   []string // LISTENed, in order; guarded by mu
	listenErrs int      // Listen fails this many times first; guarded by mu
	closed     bool     // guarded by mu
	pingHang   chan struct{}
	resets     atomic.Int32
}

func newFakeListener() *fakeListener {
	return &fakeListener{ch: make(chan *pq.Notification, 32)}
}

func (f *fakeListener) Listen(channel string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.listenErrs > 0 {
		f.listenErrs--
		return errors.New("pq: cannot execute LISTEN during recovery")
	}
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

// served is a Service behind an httptest server, wired as run() wires it.
type served struct {
	t   testing.TB
	svc *Service
	srv *httptest.Server
}

func serve(t testing.TB, svc *Service) *served {
	srv := httptest.NewUnstartedServer(nil)
	srv.Config = svc.httpServer()
	srv.Listener = trackingListener{srv.Listener}
	srv.Start()
	return &served{t: t, svc: svc, srv: srv}
}

func (s *served) wsURL() string { return "ws" + strings.TrimPrefix(s.srv.URL, "http") + "/ws" }

// stats returns /stats decoded.
func (s *served) stats() map[string]any {
	s.t.Helper()
	code, m := getJSON(s.t, s.srv.URL+"/stats")
	if code != http.StatusOK {
		s.t.Fatalf("/stats: status %d", code)
	}
	return m
}

// stat returns one numeric /stats field.
func (s *served) stat(key string) float64 {
	s.t.Helper()
	v, ok := s.stats()[key].(float64)
	if !ok {
		s.t.Fatalf("/stats has no numeric %q", key)
	}
	return v
}

// harness is a running Service with a fake listener behind an httptest server.
type harness struct {
	*served
	l *fakeListener
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

	h := &harness{served: serve(t, svc), l: l}
	srv := h.srv
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
	dead bool   // never answer pings: a peer that has silently gone away
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
			if !c.dead {
				c.writeFrame(websocket.PongFrame, payload)
			}
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

// ---------------------------------------------------------------------------
// Helpers for the tests below.

// waitStat waits until a numeric /stats field has the value want.
func (h *harness) waitStat(key string, want float64) {
	h.t.Helper()
	waitFor(h.t, fmt.Sprintf("/stats %s == %v", key, want), func() bool { return h.stat(key) == want })
}

// markerChannel is a NOTIFY channel no test uses for anything else: a
// notification on it, sent last, tells a client that everything sent before
// it has been routed (delivery is in order).
const markerChannel = "zz_marker"

// untilMarker reads frames until the marker notification (the client must be
// subscribed to markerChannel) and returns the entity_ids received before it.
func (c *wsClient) untilMarker() []int {
	c.t.Helper()
	var ids []int
	for {
		m := c.read()
		if m["type"] != "notification" {
			c.t.Fatalf("got %v, want notifications", m)
		}
		if m["notification_type"] == markerChannel {
			return ids
		}
		ids = append(ids, int(m["entity_id"].(float64)))
	}
}

func (h *harness) notifyMarker() {
	h.l.notify(markerChannel, `{"entity_type":"marker","entity_id":0}`)
}

// request sends method to url with header and returns the response and its body.
func request(t *testing.T, method, url string, header http.Header) (*http.Response, []byte) {
	t.Helper()
	req, _ := http.NewRequest(method, url, nil)
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp, body
}

// jsonError checks that an HTTP error response is JSON {"error": ...} and returns the message.
func jsonError(t *testing.T, resp *http.Response, body []byte) string {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(body, &m); err != nil || resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("status %d: body %q (Content-Type %q) is not JSON", resp.StatusCode, body, resp.Header.Get("Content-Type"))
	}
	msg, _ := m["error"].(string)
	if msg == "" {
		t.Fatalf("status %d: body %s has no error message", resp.StatusCode, body)
	}
	return msg
}

// handshakeBody reads the body of a refused WebSocket handshake.
func handshakeBody(t *testing.T, resp *http.Response) []byte {
	t.Helper()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading the refused handshake's body: %v", err)
	}
	return body
}

// freePort returns a loopback port that was free a moment ago.
func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	return port
}

// syncBuffer is an io.Writer safe for run's concurrent logging.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// runArgs runs the program to completion (it must not start serving) and
// returns its exit code, stdout and stderr.
func runArgs(t *testing.T, args, env []string) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // should a case start the server after all, it stops at once
	base := []string{"ATTUNE__NOTIFIER__HOST=127.0.0.1", "ATTUNE__NOTIFIER__PORT=" + freePort(t), "ATTUNE__LOG__CONSOLE=false"}
	var stdout, stderr syncBuffer
	code := run(ctx, args, append(base, env...), &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

// writeFile writes a file in a fresh temporary directory and returns its path.
func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// frameText returns the payload of a server frame that is either bare JSON or
// a complete unmasked WebSocket frame.
func frameText(frame []byte) []byte {
	if len(frame) < 2 || frame[0] == '{' {
		return frame
	}
	switch frame[1] & 0x7f {
	case 126:
		return frame[4:]
	case 127:
		return frame[10:]
	}
	return frame[2:]
}

// ---------------------------------------------------------------------------
// Payload parsing

func TestParseNotification(t *testing.T) {
	now := time.Date(2025, 3, 4, 5, 6, 7, 890123000, time.FixedZone("CET", 3600))
	good := []struct {
		name, payload string
		entityType    string
		entityID      string // as JSON, to check large values exactly
		userID        string // as JSON; "null" when absent or not an integer
	}{
		{"trigger shape", `{"entity_type":"execution","entity_id":123,"id":123,"status":"succeeded"}`, "execution", "123", "null"},
		{"integer user_id", `{"entity_type":"inquiry","entity_id":5,"user_id":42}`, "inquiry", "5", "42"},
		{"string user_id", `{"entity_type":"inquiry","entity_id":5,"user_id":"42"}`, "inquiry", "5", "null"},
		{"fractional user_id", `{"entity_type":"inquiry","entity_id":5,"user_id":4.5}`, "inquiry", "5", "null"},
		{"null user_id", `{"entity_type":"inquiry","entity_id":5,"user_id":null}`, "inquiry", "5", "null"},
		{"largest entity_id", `{"entity_type":"event","entity_id":9223372036854775807}`, "event", "9223372036854775807", "null"},
		{"negative entity_id", `{"entity_type":"event","entity_id":-7,"user_id":-1}`, "event", "-7", "-1"},
		{"any key order, nesting, unicode, spaces", " \n{\"nested\":{\"a\":[1,2.5,null]},\"entity_id\":0,\"entity_type\":\"r\u00e9gle \\\"x\\\"\"}\n",
			"r\u00e9gle \"x\"", "0", "null"},
		{"spaces around keys and values", `{ "entity_type" : "execution" , "entity_id" : 1 , "user_id" : 2 }`, "execution", "1", "2"},
		{"nested and quoted decoys are ignored",
			`{"meta":{"entity_type":"decoy","entity_id":99,"user_id":98},"note":"\"entity_id\":77","list":[{"user_id":5}],"entity_type":"execution","entity_id":1}`,
			"execution", "1", "null"},
		{"duplicate keys: the last wins, as in encoding/json", `{"entity_type":"a","entity_id":1,"entity_type":"b","entity_id":2}`, "b", "2", "null"},
	}
	for _, tc := range good {
		t.Run(tc.name, func(t *testing.T) {
			n, err := parseNotification("execution_status_changed", tc.payload, now)
			if err != nil {
				t.Fatalf("parseNotification: %v", err)
			}
			if n.Type != "execution_status_changed" || n.EntityType != tc.entityType || strconv.FormatInt(n.EntityID, 10) != tc.entityID {
				t.Errorf("got %+v", n)
			}
			var f map[string]json.RawMessage
			if err := json.Unmarshal(frameText(n.Frame), &f); err != nil {
				t.Fatalf("frame %s is not a JSON object: %v", n.Frame, err)
			}
			wantEntityType, _ := json.Marshal(tc.entityType)
			want := map[string]string{
				"type":              `"notification"`,
				"notification_type": `"execution_status_changed"`,
				"entity_type":       string(wantEntityType),
				"entity_id":         tc.entityID,
				"user_id":           tc.userID,
				"payload":           strings.TrimSpace(tc.payload), // embedded unchanged
			}
			for k, v := range want {
				if string(f[k]) != v {
					t.Errorf("%s = %s, want %s", k, f[k], v)
				}
			}
			var ts string
			json.Unmarshal(f["timestamp"], &ts)
			got, err := time.Parse(time.RFC3339Nano, ts)
			if err != nil || !strings.HasSuffix(ts, "Z") || got.Sub(now).Abs() >= time.Microsecond {
				t.Errorf("timestamp %s, want %s in RFC 3339 UTC with Z", f["timestamp"], now.UTC().Format(time.RFC3339Nano))
			}
			if len(f) != len(want)+1 {
				t.Errorf("frame %s has fields other than %v and timestamp", n.Frame, want)
			}
		})
	}

	// Channel names are quoted identifiers in PostgreSQL: anything goes.
	const channel = `odd "channel" \ é`
	n, err := parseNotification(channel, `{"entity_type":"x","entity_id":1}`, now)
	var f struct {
		NotificationType string `json:"notification_type"`
	}
	if err != nil || json.Unmarshal(frameText(n.Frame), &f) != nil || f.NotificationType != channel {
		t.Errorf("channel %q: notification_type %q (%v)", channel, f.NotificationType, err)
	}

	bad := []struct{ name, payload, want string }{
		{"empty", ``, "not a JSON object"},
		{"not JSON", `execution 123 done`, "not a JSON object"},
		{"truncated object", `{"entity_type":"execution","entity_id":1`, "not valid JSON"},
		{"trailing garbage", `{"entity_type":"execution","entity_id":1} x`, "not valid JSON"},
		{"array", `[{"entity_type":"execution","entity_id":1}]`, "not a JSON object"},
		{"string", `"execution"`, "not a JSON object"},
		{"number", `123`, "not a JSON object"},
		{"null", `null`, "not a JSON object"},
		{"missing entity_type", `{"entity_id":1}`, `no string "entity_type"`},
		{"numeric entity_type", `{"entity_type":5,"entity_id":1}`, `no string "entity_type"`},
		{"null entity_type", `{"entity_type":null,"entity_id":1}`, `no string "entity_type"`},
		{"missing entity_id", `{"entity_type":"execution"}`, `no integer "entity_id"`},
		{"fractional entity_id", `{"entity_type":"execution","entity_id":1.5}`, `no integer "entity_id"`},
		{"entity_id 1.0", `{"entity_type":"execution","entity_id":1.0}`, `no integer "entity_id"`},
		{"string entity_id", `{"entity_type":"execution","entity_id":"12"}`, `no integer "entity_id"`},
		{"exponent entity_id", `{"entity_type":"execution","entity_id":1e3}`, `no integer "entity_id"`},
		{"entity_id beyond int64", `{"entity_type":"execution","entity_id":9223372036854775808}`, `no integer "entity_id"`},
		{"null entity_id", `{"entity_type":"execution","entity_id":null}`, `no integer "entity_id"`},
		{"boolean entity_id", `{"entity_type":"execution","entity_id":true}`, `no integer "entity_id"`},
		{"fields only in a nested object", `{"data":{"entity_type":"execution","entity_id":1}}`, `no string "entity_type"`},
		{"invalid UTF-8", "{\"entity_type\":\"exe\xffcution\",\"entity_id\":1}", "UTF-8"},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			n, err := parseNotification("execution_status_changed", tc.payload, now)
			if err == nil {
				t.Fatalf("accepted, frame %s", n.Frame)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q, want it to mention %q", err, tc.want)
			}
		})
	}
}

func TestBadNotifyIsDroppedAndCounted(t *testing.T) {
	h := newHarness(t, nil)
	c := dial(t, h.wsURL())
	c.subscribe("all")
	h.l.notify("execution_created", `{"entity_type":"execution","entity_id":"1"}`)
	h.l.notify("execution_created", `not json`)
	h.l.notify("execution_created", `{"entity_type":"execution","entity_id":2}`)
	if m := c.read(); m["entity_id"] != 2.0 {
		t.Fatalf("first frame after two bad NOTIFYs = %v, want the good notification", m)
	}
	h.waitStat("notifications_received", 3)
	s := h.stats()
	if s["notifications_dropped"] != 2.0 || s["notifications_delivered"] != 1.0 {
		t.Fatalf("stats = %v, want 2 dropped and 1 delivered", s)
	}
}

// ---------------------------------------------------------------------------
// Filters

func TestParseFilter(t *testing.T) {
	valid := []string{
		"all", "entity_type:execution", "entity:execution:123", "entity:execution:-1", "user:42",
		"notification_type:execution_status_changed",
	}
	for _, s := range valid {
		f, err := ParseFilter(s)
		if err != nil {
			t.Errorf("ParseFilter(%q): %v", s, err)
		} else if f.String() != s {
			t.Errorf("ParseFilter(%q).String() = %q", s, f.String())
		}
	}
	invalid := []struct{ filter, want string }{
		{"", "expected all, entity_type:TYPE"},
		{"everything", "expected all, entity_type:TYPE"},
		{"ALL", "expected all, entity_type:TYPE"},
		{"all:x", "takes 1 part"},
		{"entity_type", "takes 2 part"},
		{"entity_type:", "empty part"},
		{"entity_type:a:b", "takes 2 part"},
		{"entity:execution", "takes 3 part"},
		{"entity:execution:1:2", "takes 3 part"},
		{"entity::1", "empty part"},
		{"entity:execution:", "empty part"},
		{"entity:execution:abc", `"abc" is not an integer`},
		{"entity:execution:1.5", "not an integer"},
		{"user:", "empty part"},
		{"user:alice", "not an integer"},
		{"user:+1", "not an integer"},
		{"user:1e3", "not an integer"},
		{"user:9223372036854775808", "not an integer"},
		{"notification_type:", "empty part"},
	}
	for _, tc := range invalid {
		_, err := ParseFilter(tc.filter)
		if err == nil {
			t.Errorf("ParseFilter(%q) accepted it", tc.filter)
			continue
		}
		if msg := err.Error(); !strings.Contains(msg, tc.want) || !strings.Contains(msg, strconv.Quote(tc.filter)) {
			t.Errorf("ParseFilter(%q): error %q, want it to quote the filter and mention %q", tc.filter, msg, tc.want)
		}
	}
}

func TestFilterMatching(t *testing.T) {
	// The notifications every client is offered, by entity_id.
	sequence := []struct{ channel, payload string }{
		{"execution_status_changed", `{"entity_type":"execution","entity_id":1,"user_id":7}`},
		{"execution_created", `{"entity_type":"execution","entity_id":2}`},
		{"inquiry_created", `{"entity_type":"inquiry","entity_id":3,"user_id":8}`},
		{"event_created", `{"entity_type":"event","entity_id":4,"user_id":"7"}`}, // a string user_id is no user
	}
	cases := []struct {
		name    string
		filters []string
		want    []int
	}{
		{"all", []string{"all"}, []int{1, 2, 3, 4}},
		{"entity_type", []string{"entity_type:execution"}, []int{1, 2}},
		{"entity_type, no match", []string{"entity_type:workflow"}, nil},
		{"entity", []string{"entity:execution:2"}, []int{2}},
		{"entity, type matches but not id", []string{"entity:execution:3"}, nil},
		{"entity, id matches but not type", []string{"entity:inquiry:1"}, nil},
		{"user", []string{"user:7"}, []int{1}},
		{"user, no match", []string{"user:9"}, nil},
		{"notification_type", []string{"notification_type:inquiry_created"}, []int{3}},
		{"notification_type, no match", []string{"notification_type:enforcement_created"}, nil},
		{"filters are OR'ed", []string{"entity_type:inquiry", "entity:execution:2"}, []int{2, 3}},
		{"several matching filters deliver once", []string{
			"all", "entity_type:execution", "entity:execution:1", "user:7", "notification_type:execution_status_changed",
		}, []int{1, 2, 3, 4}},
	}
	h := newHarness(t, nil)
	clients := make([]*wsClient, len(cases))
	for i, tc := range cases {
		clients[i] = dial(t, h.wsURL())
		for _, f := range append(tc.filters, "notification_type:"+markerChannel) {
			clients[i].subscribe(f)
		}
	}
	bystander := dial(t, h.wsURL()) // no filters: receives nothing
	for _, n := range sequence {
		h.l.notify(n.channel, n.payload)
	}
	h.notifyMarker()
	for i, tc := range cases {
		if got := clients[i].untilMarker(); !slices.Equal(got, tc.want) {
			t.Errorf("%s %v: got entity_ids %v, want %v", tc.name, tc.filters, got, tc.want)
		}
	}
	bystander.expectSilence(200 * time.Millisecond)
}

func TestDeliveryKeepsOrder(t *testing.T) {
	h := newHarness(t, nil)
	c := dial(t, h.wsURL())
	c.subscribe("entity_type:execution")
	c.subscribe("notification_type:execution_created") // also matches: still once each
	const n = 200
	go func() {
		for i := range n {
			h.l.notify("execution_created", fmt.Sprintf(`{"entity_type":"execution","entity_id":%d}`, i))
		}
	}()
	for i := range n {
		if m := c.read(); m["entity_id"] != float64(i) {
			t.Fatalf("notification %d: got %v", i, m)
		}
	}
}

func TestDuplicateSubscribeAndUnsubscribe(t *testing.T) {
	h := newHarness(t, nil)
	c := dial(t, h.wsURL())
	c.subscribe("notification_type:" + markerChannel)
	c.subscribe("entity_type:execution")
	c.subscribe("entity_type:execution") // acknowledged, but a no-op
	if got := h.stat("total_subscriptions"); got != 2 {
		t.Fatalf("total_subscriptions = %v after a duplicate subscribe, want 2", got)
	}
	h.l.notify("execution_created", `{"entity_type":"execution","entity_id":1}`)
	h.notifyMarker()
	if got := c.untilMarker(); !slices.Equal(got, []int{1}) {
		t.Fatalf("got %v, want [1]: one copy despite the duplicate subscribe", got)
	}

	c.send(`{"type":"unsubscribe","filter":"entity_type:execution","id":"u1"}`)
	if m := c.read(); m["type"] != "unsubscribed" || m["id"] != "u1" || m["filter"] != "entity_type:execution" {
		t.Fatalf("got %v, want the unsubscribed acknowledgement", m)
	}
	h.l.notify("execution_created", `{"entity_type":"execution","entity_id":2}`)
	h.notifyMarker()
	if got := c.untilMarker(); len(got) != 0 {
		t.Fatalf("got %v after unsubscribing, want nothing", got)
	}
	if got := h.stat("total_subscriptions"); got != 1 {
		t.Fatalf("total_subscriptions = %v after unsubscribing, want 1", got)
	}
}

// ---------------------------------------------------------------------------
// Subscriber bookkeeping

func TestStatsTrackClientsAndSubscriptions(t *testing.T) {
	h := newHarness(t, nil)
	if s := h.stats(); s["connected_clients"] != 0.0 || s["total_subscriptions"] != 0.0 {
		t.Fatalf("fresh service: %v", s)
	}
	a, b := dial(t, h.wsURL()), dial(t, h.wsURL())
	a.subscribe("all")
	a.subscribe("user:1")
	b.subscribe("entity_type:execution")
	if s := h.stats(); s["connected_clients"] != 2.0 || s["total_subscriptions"] != 3.0 {
		t.Fatalf("two clients, three filters: %v", s)
	}
	a.conn.Close()
	h.waitStat("connected_clients", 1)
	if got := h.stat("total_subscriptions"); got != 1 {
		t.Fatalf("total_subscriptions = %v after a client with 2 filters left, want 1", got)
	}
	b.send(map[string]any{"type": "unsubscribe", "filter": "entity_type:execution"}) // no id: no reply
	h.waitStat("total_subscriptions", 0)
	b.conn.Close()
	h.waitStat("connected_clients", 0)
}

// ---------------------------------------------------------------------------
// WebSocket protocol

func TestWelcome(t *testing.T) {
	h := newHarness(t, nil)
	var last uint64
	for range 3 {
		c, _ := dialRaw(t, h.wsURL(), nil)
		m := c.read()
		if len(m) != 3 || m["type"] != "welcome" || m["message"] != "Connected to Attune Notifier" {
			t.Fatalf("welcome = %v", m)
		}
		id, _ := m["client_id"].(string)
		n, err := strconv.ParseUint(strings.TrimPrefix(id, "client_"), 10, 64)
		if !strings.HasPrefix(id, "client_") || err != nil || n <= last {
			t.Fatalf("client_id %q, want client_N with N above %d", id, last)
		}
		last = n
	}
}

func TestRepliesOnlyWhenAskedWithID(t *testing.T) {
	h := newHarness(t, nil)
	c := dial(t, h.wsURL())
	// Without an id, nothing comes back: the pong to the final ping must be the next frame.
	c.send(`{"type":"subscribe","filter":"all"}`)
	c.send(`{"type":"unsubscribe","filter":"all"}`)
	c.send(`{"type":"ping"}`)
	c.send(`{"type":"ping","id":null}`)
	c.send(`{"type":"ping","id":"sentinel"}`)
	if got := c.readRaw(); got != `{"type":"pong","id":"sentinel"}` {
		t.Fatalf("got %s, want only the pong to the ping with an id", got)
	}
	c.send(`{"type":"ping"}`)
	c.expectSilence(200 * time.Millisecond)

	// With an id (string or number), the reply echoes it verbatim.
	c = dial(t, h.wsURL())
	cases := []struct{ send, want string }{
		{`{"type":"subscribe","filter":"entity_type:execution","id":"s-1"}`, `{"type":"subscribed","id":"s-1","filter":"entity_type:execution"}`},
		{`{"type":"subscribe","filter":"user:5","id":42}`, `{"type":"subscribed","id":42,"filter":"user:5"}`},
		{`{"type":"unsubscribe","filter":"user:5","id":-1.5}`, `{"type":"unsubscribed","id":-1.5,"filter":"user:5"}`},
		{`{"type":"unsubscribe","filter":"user:6","id":"not subscribed"}`, `{"type":"unsubscribed","id":"not subscribed","filter":"user:6"}`},
		{`{"type":"ping","id":12345678901234567890}`, `{"type":"pong","id":12345678901234567890}`},
		{`{"id":"p","type":"ping"}`, `{"type":"pong","id":"p"}`},
	}
	for _, tc := range cases {
		c.send(tc.send)
		if got := c.readRaw(); got != tc.want {
			t.Errorf("sent %s: got %s, want %s", tc.send, got, tc.want)
		}
	}
	if got := h.stat("total_subscriptions"); got != 1 {
		t.Fatalf("total_subscriptions = %v, want 1 (entity_type:execution)", got)
	}
}

func TestProtocolErrors(t *testing.T) {
	h := newHarness(t, nil)
	c := dial(t, h.wsURL())
	cases := []struct {
		name, send string
		want       string // in the error message
		id         any    // echoed id, nil for none
	}{
		{"invalid JSON", `{"type":"subscribe",`, "invalid JSON", nil},
		{"empty message", ``, "invalid JSON", nil},
		{"array", `["subscribe","all"]`, "must be a JSON object", nil},
		{"string", `"subscribe"`, "must be a JSON object", nil},
		{"null", `null`, "must be a JSON object", nil},
		{"missing type", `{"filter":"all"}`, `missing "type"`, nil},
		{"non-string type", `{"type":1,"filter":"all"}`, `"type" must be a string`, nil},
		{"unknown type", `{"type":"publish","filter":"all"}`, `unknown type "publish"`, nil},
		{"missing filter", `{"type":"subscribe"}`, `missing "filter"`, nil},
		{"null filter", `{"type":"unsubscribe","filter":null}`, `missing "filter"`, nil},
		{"non-string filter", `{"type":"subscribe","filter":["all"]}`, `"filter" must be a string`, nil},
		{"invalid filter", `{"type":"subscribe","filter":"entity:execution"}`, `invalid filter "entity:execution"`, nil},
		{"invalid filter in unsubscribe", `{"type":"unsubscribe","filter":"user:bob"}`, `invalid filter "user:bob"`, nil},
		{"boolean id", `{"type":"ping","id":true}`, `"id" must be a string or a number`, nil},
		{"object id", `{"type":"ping","id":{"n":1}}`, `"id" must be a string or a number`, nil},
		{"error echoes a string id", `{"type":"subscribe","filter":"bogus","id":"s-9"}`, `invalid filter "bogus"`, "s-9"},
		{"error echoes a number id", `{"type":"frobnicate","id":7}`, `unknown type "frobnicate"`, 7.0},
		{"error echoes the id of a message without type", `{"id":"x"}`, `missing "type"`, "x"},
	}
	for _, tc := range cases {
		c.send(tc.send)
		m := c.read()
		msg, _ := m["message"].(string)
		if m["type"] != "error" || !strings.Contains(msg, tc.want) || m["id"] != tc.id {
			t.Errorf("%s: sent %s, got %v; want an error mentioning %q with id %v", tc.name, tc.send, m, tc.want, tc.id)
		}
		c.subscribe("entity_type:execution") // the connection is still open and working
	}

	if err := c.writeFrame(websocket.BinaryFrame, []byte(`{"type":"ping","id":1}`)); err != nil {
		t.Fatal(err)
	}
	if m := c.read(); m["type"] != "error" || !strings.Contains(m["message"].(string), "binary frames are not supported") {
		t.Errorf("binary frame: got %v", m)
	}
	c.subscribe("entity_type:execution")

	if got := h.stat("client_errors"); got != float64(len(cases)+1) {
		t.Errorf("client_errors = %v, want %d", got, len(cases)+1)
	}
	h.l.notify("execution_created", `{"entity_type":"execution","entity_id":1}`)
	if m := c.read(); m["type"] != "notification" {
		t.Fatalf("after the errors, got %v, want the notification", m)
	}
}

func TestTooManySubscriptions(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.Notifier.MaxSubscriptions = 2 })
	c := dial(t, h.wsURL())
	c.subscribe("user:1")
	c.subscribe("user:2")
	c.send(`{"type":"subscribe","filter":"user:3","id":"third"}`)
	if m := c.read(); m["type"] != "error" || m["id"] != "third" || !strings.Contains(m["message"].(string), "too many subscriptions (limit 2)") {
		t.Fatalf("third filter: got %v", m)
	}
	c.subscribe("user:2") // already there: still fine at the limit
	c.send(`{"type":"unsubscribe","filter":"user:1"}`)
	c.subscribe("user:3")
	h.l.notify("execution_created", `{"entity_type":"execution","entity_id":3,"user_id":3}`)
	if m := c.read(); m["entity_id"] != 3.0 {
		t.Fatalf("got %v, want the notification for user 3", m)
	}
}

func TestOversizedFrameCloses1009(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.Notifier.MaxMessageBytes = 1000 })
	c := dial(t, h.wsURL())
	atLimit := `{"type":"ping","id":"` + strings.Repeat("x", 1000-len(`{"type":"ping","id":""}`)) + `"}`
	c.send(atLimit)
	if m := c.read(); m["type"] != "pong" {
		t.Fatalf("a message of exactly max_message_bytes: got %v, want a pong", m)
	}
	c.send(`{"type":"ping","id":"` + strings.Repeat("x", 1000) + `"}`)
	if code, reason := c.closeCode(); code != 1009 || !strings.Contains(reason, "1000 bytes") {
		t.Fatalf("close %d %q, want 1009 naming the limit", code, reason)
	}
	c.conn.Close()
	h.waitStat("connected_clients", 0)
}

// ---------------------------------------------------------------------------
// HTTP endpoints

func TestHealth(t *testing.T) {
	h := newHarness(t, nil)
	expect := func(when string, wantCode int, wantReason string) {
		t.Helper()
		code, m := getJSON(t, h.srv.URL+"/health")
		if wantCode == http.StatusOK {
			if code != 200 || m["status"] != "ok" || len(m) != 1 {
				t.Fatalf("%s: %d %v, want 200 {\"status\":\"ok\"}", when, code, m)
			}
			return
		}
		reason, _ := m["reason"].(string)
		if code != wantCode || m["status"] != "unavailable" || !strings.Contains(reason, wantReason) {
			t.Fatalf("%s: %d %v, want %d unavailable with a reason mentioning %q", when, code, m, wantCode, wantReason)
		}
	}
	expect("connected", 200, "")
	h.svc.onListenerEvent(pq.ListenerEventDisconnected, errors.New("server closed the connection unexpectedly"))
	expect("disconnected", 503, "database connection lost: server closed the connection unexpectedly")
	if h.stats()["listener_connected"] != false {
		t.Fatal("/stats listener_connected is not false while disconnected")
	}
	h.svc.onListenerEvent(pq.ListenerEventConnectionAttemptFailed, errors.New("connection refused"))
	expect("reconnect attempt failed", 503, "cannot connect to the database: connection refused")
	h.svc.onListenerEvent(pq.ListenerEventReconnected, nil)
	expect("reconnected", 200, "")
	if s := h.stats(); s["listener_connected"] != true || s["listener_reconnects"] != 1.0 {
		t.Fatalf("after a reconnect: %v", s)
	}
}

func TestStatsFields(t *testing.T) {
	h := newHarness(t, nil)
	s := h.stats()
	for _, k := range []string{
		"connected_clients", "total_subscriptions", "notifications_received", "notifications_delivered",
		"notifications_dropped", "slow_consumer_disconnects", "listener_reconnects", "uptime_seconds",
	} {
		if v, ok := s[k].(float64); !ok || v != 0 {
			t.Errorf("%s = %#v, want 0 on a fresh service", k, s[k])
		}
	}
	if s["listener_connected"] != true {
		t.Errorf("listener_connected = %#v, want true", s["listener_connected"])
	}
}

func TestHTTPErrors(t *testing.T) {
	h := newHarness(t, nil)
	cases := []struct {
		method, path string
		header       http.Header
		status       int
		want         string
	}{
		{"GET", "/", nil, 404, "not found"},
		{"GET", "/metrics", nil, 404, "not found"},
		{"POST", "/stats", nil, 405, "method not allowed"},
		{"DELETE", "/health", nil, 405, "method not allowed"},
		{"POST", "/ws", nil, 405, "method not allowed"},
		{"GET", "/ws", nil, 426, "WebSocket"},
		{"GET", "/ws", http.Header{"Upgrade": {"h2c"}, "Connection": {"Upgrade"}}, 426, "WebSocket"},
	}
	for _, tc := range cases {
		resp, body := request(t, tc.method, h.srv.URL+tc.path, tc.header)
		if resp.StatusCode != tc.status {
			t.Errorf("%s %s: status %d, want %d", tc.method, tc.path, resp.StatusCode, tc.status)
			continue
		}
		if msg := jsonError(t, resp, body); !strings.Contains(msg, tc.want) {
			t.Errorf("%s %s: error %q, want it to mention %q", tc.method, tc.path, msg, tc.want)
		}
		if tc.status == 405 && !strings.Contains(resp.Header.Get("Allow"), "GET") {
			t.Errorf("%s %s: Allow = %q", tc.method, tc.path, resp.Header.Get("Allow"))
		}
	}
}

func TestCORS(t *testing.T) {
	preflight := http.Header{"Origin": {"https://ui.example.com"}, "Access-Control-Request-Method": {"GET"}}

	t.Run("wildcard by default", func(t *testing.T) {
		h := newHarness(t, nil)
		for _, path := range []string{"/health", "/stats"} {
			resp, _ := request(t, "GET", h.srv.URL+path, http.Header{"Origin": {"https://anywhere.example"}})
			if got := resp.Header.Get("Access-Control-Allow-Origin"); got != "*" {
				t.Errorf("GET %s: Access-Control-Allow-Origin = %q, want *", path, got)
			}
		}
		resp, _ := request(t, "OPTIONS", h.srv.URL+"/stats", preflight)
		if resp.StatusCode != 204 || resp.Header.Get("Access-Control-Allow-Origin") != "*" ||
			!strings.Contains(resp.Header.Get("Access-Control-Allow-Methods"), "GET") {
			t.Errorf("preflight: %d %v", resp.StatusCode, resp.Header)
		}
	})

	t.Run("configured origins", func(t *testing.T) {
		h := newHarness(t, func(c *Config) {
			c.Notifier.AllowedOrigins = []string{"https://ui.example.com", "http://localhost:3000"}
		})
		resp, _ := request(t, "GET", h.srv.URL+"/health", http.Header{"Origin": {"http://localhost:3000"}})
		if got := resp.Header.Get("Access-Control-Allow-Origin"); got != "http://localhost:3000" || resp.Header.Get("Vary") != "Origin" {
			t.Errorf("allowed origin: Allow-Origin %q, Vary %q", got, resp.Header.Get("Vary"))
		}
		resp, _ = request(t, "GET", h.srv.URL+"/health", http.Header{"Origin": {"https://evil.example"}})
		if got := resp.Header.Get("Access-Control-Allow-Origin"); got != "" {
			t.Errorf("disallowed origin got Access-Control-Allow-Origin %q", got)
		}
		resp, _ = request(t, "OPTIONS", h.srv.URL+"/health", preflight)
		if resp.StatusCode != 204 || resp.Header.Get("Access-Control-Allow-Origin") != "https://ui.example.com" ||
			!strings.Contains(resp.Header.Get("Access-Control-Allow-Methods"), "GET") {
			t.Errorf("preflight from an allowed origin: %d %v", resp.StatusCode, resp.Header)
		}

		// WebSocket: a disallowed Origin is refused, an allowed one or none (CLIs, scripts) is let in.
		c, resp := dialRaw(t, h.wsURL(), http.Header{"Origin": {"https://evil.example"}})
		if resp.StatusCode != 403 || !strings.Contains(jsonError(t, resp, handshakeBody(t, resp)), "origin not allowed") {
			t.Errorf("disallowed origin: status %d, want 403", resp.StatusCode)
		}
		c.conn.Close()
		for _, header := range []http.Header{nil, {"Origin": {"https://ui.example.com"}}} {
			c, resp := dialRaw(t, h.wsURL(), header)
			if resp.StatusCode != 101 {
				t.Fatalf("Origin %q: status %d, want 101", header.Get("Origin"), resp.StatusCode)
			}
			if m := c.read(); m["type"] != "welcome" {
				t.Fatalf("Origin %q: got %v, want the welcome", header.Get("Origin"), m)
			}
		}
	})
}

func TestMaxConnections(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.Notifier.MaxConnections = 2 })
	a := dial(t, h.wsURL())
	dial(t, h.wsURL())
	c, resp := dialRaw(t, h.wsURL(), nil)
	if resp.StatusCode != 503 || !strings.Contains(jsonError(t, resp, handshakeBody(t, resp)), "too many connections") {
		t.Fatalf("third connection: status %d, want 503", resp.StatusCode)
	}
	c.conn.Close()

	a.conn.Close()
	h.waitStat("connected_clients", 1)
	// The slot is released a moment after the client is unregistered.
	waitFor(t, "a new connection to be accepted", func() bool {
		c, resp := dialRaw(t, h.wsURL(), nil)
		if resp.StatusCode != 101 {
			c.conn.Close()
			return false
		}
		return c.read()["type"] == "welcome"
	})
}

// ---------------------------------------------------------------------------
// Flow control, keep-alive, resync and shutdown

func TestSlowConsumerIsDisconnected(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.Notifier.ClientQueue = 4 })
	slow, healthy := dial(t, h.wsURL()), dial(t, h.wsURL())
	slow.subscribe("all")
	healthy.subscribe("all")
	// slow stops reading. Once the kernel buffers between it and the server
	// are full, its queue fills and it is cut off; healthy keeps up, in order.
	pad := strings.Repeat("x", 7000)
	sent := 0
	for extra := 0; extra < 10; sent++ {
		if sent == 20000 {
			t.Fatal("the non-reading client was never disconnected")
		}
		if h.svc.stats.SlowConsumers.Load() > 0 {
			extra++ // a few more, to show healthy is unaffected afterwards
		}
		h.l.notify("execution_created", fmt.Sprintf(`{"entity_type":"execution","entity_id":%d,"pad":%q}`, sent, pad))
		if m := healthy.read(); m["entity_id"] != float64(sent) {
			t.Fatalf("healthy client: notification %d is %v", sent, m["entity_id"])
		}
	}
	if code, reason := slow.closeCode(); code != 1013 || reason != "slow consumer" {
		t.Fatalf("slow client closed with %d %q, want 1013 \"slow consumer\"", code, reason)
	}
	slow.conn.Close()
	if got := h.stat("slow_consumer_disconnects"); got != 1 {
		t.Fatalf("slow_consumer_disconnects = %v, want 1", got)
	}
	h.waitStat("connected_clients", 1)
	t.Logf("cut off after %d notifications of %d bytes", sent-10, len(pad))
}

func TestKeepAlive(t *testing.T) {
	const interval = 200 * time.Millisecond // a pong has about two intervals to arrive
	h := newHarness(t, func(c *Config) { c.Notifier.PingInterval = interval })

	t.Run("a peer that answers pings stays", func(t *testing.T) {
		c := dial(t, h.wsURL())
		c.expectSilence(5 * interval) // readFrame answers the pings meanwhile
		c.send(`{"type":"ping","id":"still there"}`)
		if m := c.read(); m["type"] != "pong" {
			t.Fatalf("after %v of pings only, got %v, want a pong", 5*interval, m)
		}
	})

	t.Run("a silent peer is closed", func(t *testing.T) {
		c := dial(t, h.wsURL())
		c.dead = true
		start := time.Now()
		code, reason := c.closeCode()
		if !(code == 1001 && reason == "keep-alive timeout" || code == 0) {
			t.Fatalf("close %d %q, want 1001 \"keep-alive timeout\"", code, reason)
		}
		if d := time.Since(start); d > 20*interval {
			t.Fatalf("closed after %v, want within a few ping intervals of %v", d, interval)
		}
		t.Logf("closed with %d %q after %v", code, reason, time.Since(start))
	})
}

func TestResyncAfterReconnect(t *testing.T) {
	h := newHarness(t, nil)
	subscribed, bare := dial(t, h.wsURL()), dial(t, h.wsURL())
	subscribed.subscribe("entity_type:execution")
	h.svc.onListenerEvent(pq.ListenerEventDisconnected, errors.New("connection reset"))
	h.svc.onListenerEvent(pq.ListenerEventReconnected, nil)
	h.l.ch <- nil // what pq sends on Notify after re-establishing the connection
	for _, c := range []*wsClient{subscribed, bare} {
		m := c.read()
		reason, _ := m["reason"].(string)
		if m["type"] != "resync" || m["notification_type"] != "resync" || reason == "" {
			t.Fatalf("got %v, want a resync frame with a reason", m)
		}
		if ts, _ := m["timestamp"].(string); !strings.HasSuffix(ts, "Z") {
			t.Fatalf("resync timestamp %q", ts)
		}
	}
	if s := h.stats(); s["listener_reconnects"] != 1.0 || s["resyncs"] != 1.0 {
		t.Fatalf("stats after one reconnect: %v", s)
	}
	h.l.notify("execution_created", `{"entity_type":"execution","entity_id":5}`)
	if m := subscribed.read(); m["entity_id"] != 5.0 {
		t.Fatalf("after the resync, got %v", m)
	}
}

func TestCloseAllClosesClientsWith1001(t *testing.T) {
	h := newHarness(t, nil)
	a, b := dial(t, h.wsURL()), dial(t, h.wsURL())
	a.subscribe("all")
	h.svc.hub.closeAll(1001, "server shutting down")
	for _, c := range []*wsClient{a, b} {
		if code, reason := c.closeCode(); code != 1001 || reason != "server shutting down" {
			t.Fatalf("close %d %q, want 1001", code, reason)
		}
		c.conn.Close()
	}
	// A connection that arrives while shutting down is closed at once, without a welcome.
	c, resp := dialRaw(t, h.wsURL(), nil)
	if resp.StatusCode != 101 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	if op, p, err := c.readFrame(5 * time.Second); err != nil || op != websocket.CloseFrame || binary.BigEndian.Uint16(p) != 1001 {
		t.Fatalf("while shutting down: frame %d %q (%v), want a 1001 close", op, p, err)
	}
	h.waitStat("connected_clients", 0)
}

// TestRunServesAndShutsDown runs the whole program against a database that
// is not there: it serves anyway, reports unhealthy, and stops cleanly.
func TestRunServesAndShutsDown(t *testing.T) {
	port := freePort(t)
	const password = "hunter2-secret"
	env := []string{
		"ATTUNE__NOTIFIER__HOST=127.0.0.1",
		"ATTUNE__NOTIFIER__PORT=" + port,
		"ATTUNE__DATABASE__URL=postgres://attune:" + password + "@127.0.0.1:1/attune?sslmode=disable",
		"ATTUNE__LOG__CONSOLE=true", // captured, to check the password stays out of the logs
		"ATTUNE__LOG__LEVEL=debug",
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stdout, stderr syncBuffer
	exit := make(chan int, 1)
	go func() { exit <- run(ctx, nil, env, &stdout, &stderr) }()

	base := "http://127.0.0.1:" + port
	waitFor(t, "the server to answer", func() bool {
		resp, err := http.Get(base + "/health")
		if err == nil {
			resp.Body.Close()
		}
		return err == nil
	})
	waitFor(t, "/health to report the failed connection", func() bool {
		code, m := getJSON(t, base+"/health")
		reason, _ := m["reason"].(string)
		return code == 503 && m["status"] == "unavailable" && strings.Contains(reason, "cannot connect to the database")
	})
	c := dial(t, "ws://127.0.0.1:"+port+"/ws")
	c.subscribe("all")

	cancel() // as SIGTERM does
	if code, reason := c.closeCode(); code != 1001 {
		t.Fatalf("on shutdown the client got %d %q, want 1001", code, reason)
	}
	c.conn.Close()
	select {
	case code := <-exit:
		if code != 0 {
			t.Fatalf("run returned %d, want 0; stderr:\n%s", code, stderr.String())
		}
	case <-time.After(15 * time.Second):
		t.Fatal("run did not return after its context was cancelled")
	}
	logs := stderr.String()
	if !strings.Contains(logs, `"msg":"starting"`) || !strings.Contains(logs, "database connection attempt failed") {
		t.Errorf("expected the start and the failed connection in the logs:\n%s", logs)
	}
	if strings.Contains(logs, password) {
		t.Errorf("the database password appears in the logs:\n%s", logs)
	}
}

func TestRunPortInUse(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	var stdout, stderr syncBuffer
	code := run(context.Background(), nil, []string{
		"ATTUNE__NOTIFIER__HOST=127.0.0.1", "ATTUNE__NOTIFIER__PORT=" + port, "ATTUNE__LOG__CONSOLE=false",
	}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), "cannot listen on 127.0.0.1:"+port) ||
		!strings.Contains(stderr.String(), "address already in use") {
		t.Fatalf("exit %d, stderr %q; want 1 and a message naming the address", code, stderr.String())
	}
}

// ---------------------------------------------------------------------------
// Configuration and command line

// seedConfig is config.notifier.yaml as the original notifier's README shows it.
const seedConfig = `service_name: attune-notifier
environment: development

database:
  url: postgresql://postgres:postgres@localhost:5432/attune
  max_connections: 10

notifier:
  host: 0.0.0.0
  port: 8081
  max_connections: 10000

log:
  level: info
  format: json
  console: true
`

func TestLoadConfigFile(t *testing.T) {
	path := writeFile(t, "config.yaml", `service_name: notifier-eu
environment: production
database:
  url: postgres://attune@db.internal:5432/attune?sslmode=require
  reconnect_min_interval: 500ms
notifier:
  host: 127.0.0.1
  port: 9000
  channels: [execution_created, "inquiry_created"]
  allowed_origins:
    - https://ui.example.com
  ping_interval: 15s
  client_queue: 64
log:
  level: debug
  format: text
  console: false
`)
	cfg, warnings, err := loadConfig(path, nil)
	if err != nil || len(warnings) != 0 {
		t.Fatalf("loadConfig: %v %v", err, warnings)
	}
	want := defaultConfig()
	want.ServiceName, want.Environment = "notifier-eu", "production"
	want.Database.URL = "postgres://attune@db.internal:5432/attune?sslmode=require"
	want.Database.ReconnectMinInterval = 500 * time.Millisecond
	want.Notifier.Host, want.Notifier.Port = "127.0.0.1", 9000
	want.Notifier.Channels = []string{"execution_created", "inquiry_created"}
	want.Notifier.AllowedOrigins = []string{"https://ui.example.com"}
	want.Notifier.PingInterval, want.Notifier.ClientQueue = 15*time.Second, 64
	want.Log = LogConfig{Level: "debug", Format: "text", Console: false}
	if fmt.Sprintf("%+v", cfg) != fmt.Sprintf("%+v", want) {
		t.Fatalf("got  %+v\nwant %+v", cfg, want)
	}

	// The seed's own file loads, and an empty file means the defaults.
	for _, content := range []string{seedConfig, ""} {
		if _, _, err := loadConfig(writeFile(t, "config.yaml", content), nil); err != nil {
			t.Errorf("loading %q: %v", content, err)
		}
	}
}

func TestLoadConfigEnvironment(t *testing.T) {
	path := writeFile(t, "config.yaml", seedConfig)
	cfg, warnings, err := loadConfig(path, []string{
		"PATH=/usr/bin",
		"ATTUNE_CONFIG=/etc/attune/config.yaml", // not an ATTUNE__ key
		"ATTUNE__NOTIFIER__PORT=9100",
		"ATTUNE__NOTIFIER__CHANNELS=execution_created, inquiry_created ,,event_created",
		"ATTUNE__NOTIFIER__PING_INTERVAL=5s",
		"ATTUNE__LOG__CONSOLE=false",
		"ATTUNE__SERVICE_NAME=edge",
		"ATTUNE__DATABASE__URL=postgres://u@h:5432/d?sslmode=disable",
		"ATTUNE__EXECUTOR__WORKERS=4", // another service's key in a shared environment
	})
	if err != nil {
		t.Fatalf("loadConfig: %v", err)
	}
	if cfg.Notifier.Port != 9100 || cfg.Notifier.PingInterval != 5*time.Second || cfg.Log.Console ||
		cfg.ServiceName != "edge" || cfg.Database.URL != "postgres://u@h:5432/d?sslmode=disable" ||
		!slices.Equal(cfg.Notifier.Channels, []string{"execution_created", "inquiry_created", "event_created"}) {
		t.Fatalf("environment overrides not applied: %+v", cfg)
	}
	if len(warnings) != 1 || !strings.Contains(warnings[0], "ATTUNE__EXECUTOR__WORKERS") {
		t.Fatalf("warnings = %q, want one naming ATTUNE__EXECUTOR__WORKERS", warnings)
	}
}

func TestLoadConfigErrors(t *testing.T) {
	cases := []struct {
		name, yaml string
		env        []string
		want       []string // all in the error
	}{
		{"unknown top-level key", "service_name: x\nlisten_port: 1\n", nil, []string{"config.yaml:2:", "listen_port", "unknown key"}},
		{"unknown key in a section", "notifier:\n  host: 127.0.0.1\n  prot: 8081\n", nil, []string{"config.yaml:3:", "notifier.prot", "unknown key"}},
		{"unknown section", "notifer:\n  port: 1\n", nil, []string{"config.yaml:1:", "notifer", "unknown key"}},
		{"section that is not a mapping", "notifier: 8081\n", nil, []string{"config.yaml:1:", "notifier", "mapping"}},
		{"not YAML", "notifier: [\n", nil, []string{"config.yaml"}},
		{"port not an integer", "notifier:\n  port: eighty\n", nil, []string{"config.yaml:2:", "notifier.port", "integer", "eighty"}},
		{"list for a single value", "notifier:\n  port: [1, 2]\n", nil, []string{"config.yaml:2:", "notifier.port", "single value"}},
		{"duration without unit", "notifier:\n  ping_interval: 30\n", nil, []string{"config.yaml:2:", "notifier.ping_interval", "duration"}},
		{"bad boolean", "log:\n  console: sometimes\n", nil, []string{"config.yaml:2:", "log.console", "true or false"}},
		{"empty value", "notifier:\n  port:\n", nil, []string{"config.yaml:2:", "notifier.port", "missing value"}},
		{"port 0", "notifier:\n  port: 0\n", nil, []string{"config.yaml:2:", "notifier.port", "between 1 and 65535"}},
		{"empty channel list", "notifier:\n  channels: []\n", nil, []string{"config.yaml:2:", "notifier.channels", "at least one channel"}},
		{"duplicate channel", "notifier:\n  channels: [a, a]\n", nil, []string{"notifier.channels", `"a" is listed twice`}},
		{"bad log level", "log:\n  level: loud\n", nil, []string{"config.yaml:2:", "log.level", "loud"}},
		{"bad log format", "log:\n  format: xml\n", nil, []string{"log.format", "xml"}},
		{"env: port not an integer", "", []string{"ATTUNE__NOTIFIER__PORT=http"}, []string{"ATTUNE__NOTIFIER__PORT", "notifier.port", "integer"}},
		{"env: port out of range", "", []string{"ATTUNE__NOTIFIER__PORT=70000"}, []string{"ATTUNE__NOTIFIER__PORT", "notifier.port", "between 1 and 65535"}},
		{"env: empty channel list", "", []string{"ATTUNE__NOTIFIER__CHANNELS= , "}, []string{"ATTUNE__NOTIFIER__CHANNELS", "notifier.channels"}},
		{"env: bad log level", "", []string{"ATTUNE__LOG__LEVEL=verbose"}, []string{"ATTUNE__LOG__LEVEL", "log.level"}},
		{"env overrides a good file value with a bad one", "notifier:\n  port: 8081\n", []string{"ATTUNE__NOTIFIER__PORT=0"}, []string{"ATTUNE__NOTIFIER__PORT", "notifier.port"}},
		{"reconnect interval inverted", "database:\n  reconnect_min_interval: 1m\n  reconnect_max_interval: 1s\n", nil, []string{"config.yaml:3:", "database.reconnect_max_interval"}},
		{"key set twice", "notifier:\n  port: 1\nlog:\n  level: info\nnotifier:\n  host: x\n", nil, []string{"config.yaml:5:", "notifier", "set twice (first at line 1)"}},
		{"origin with a path", "notifier:\n  allowed_origins: [https://app.example.com/ui]\n", nil, []string{"notifier.allowed_origins", "not an origin"}},
		{"origin without scheme", "", []string{"ATTUNE__NOTIFIER__ALLOWED_ORIGINS=app.example.com"}, []string{"ATTUNE__NOTIFIER__ALLOWED_ORIGINS", "not an origin"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := loadConfig(writeFile(t, "config.yaml", tc.yaml), tc.env)
			if err == nil {
				t.Fatal("loadConfig accepted it")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Fatalf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

func TestRunExitCodes(t *testing.T) {
	badFile := writeFile(t, "bad.yaml", "notifier:\n  port: 8081\n  max_conections: 5\n")
	cases := []struct {
		name       string
		args, env  []string
		code       int
		stdout     string
		stderr     string
		stderrLine bool // stderr is exactly one line
	}{
		{"version", []string{"--version"}, nil, 0, "attune-notifier ", "", false},
		{"help", []string{"--help"}, nil, 0, "Usage: attune-notifier", "", false},
		{"short help", []string{"-h"}, nil, 0, "-config", "", false},
		{"unknown flag", []string{"--port=1"}, nil, 2, "", "flag provided but not defined: -port", true},
		{"unexpected argument", []string{"serve"}, nil, 2, "", `unexpected argument "serve"`, true},
		{"bad --log-level", []string{"--log-level", "loud"}, nil, 2, "", "--log-level", true},
		{"missing config file", []string{"--config", filepath.Join(t.TempDir(), "nope.yaml")}, nil, 2, "", "nope.yaml", true},
		{"bad config file", []string{"--config", badFile}, nil, 2, "", badFile + ":3: notifier.max_conections: unknown key", true},
		{"ATTUNE_CONFIG names the file", nil, []string{"ATTUNE_CONFIG=" + badFile}, 2, "", badFile + ":3:", true},
		{"bad environment value", nil, []string{"ATTUNE__NOTIFIER__PORT=0"}, 2, "", "ATTUNE__NOTIFIER__PORT: notifier.port", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			code, stdout, stderr := runArgs(t, tc.args, tc.env)
			if code == 0 && stderr != "" {
				t.Errorf("exit 0 with output on stderr: %q", stderr)
			}
			if code != tc.code || !strings.Contains(stdout, tc.stdout) || !strings.Contains(stderr, tc.stderr) {
				t.Fatalf("exit %d, stdout %q, stderr %q; want %d, %q, %q", code, stdout, stderr, tc.code, tc.stdout, tc.stderr)
			}
			if tc.stderrLine && strings.Count(stderr, "\n") != 1 {
				t.Fatalf("stderr is not one line: %q", stderr)
			}
		})
	}
}

func TestDatabasePasswordNeverShown(t *testing.T) {
	const pw = "s3cr3t-pw"
	for _, dsn := range []string{
		"postgres://attune:" + pw + "@db:5432/attune",
		"postgresql://attune:" + url.QueryEscape(pw+"@/:") + "@db/attune", // percent-encoded
		"postgres://attune:" + pw + "@db:port/attune",                     // too broken for url.Parse
		"host=db user=attune password=" + pw + " dbname=attune",
		"host=db password='" + pw + " x' dbname=attune",
	} {
		if got := redactDSN(dsn, dsn); strings.Contains(got, pw) || strings.Contains(got, url.QueryEscape(pw+"@/:")) {
			t.Errorf("redactDSN(%q) = %q", dsn, got)
		}
		msg := fmt.Sprintf("cannot connect to %q: refused", dsn)
		if got := redactDSN(msg, dsn); strings.Contains(got, pw) || !strings.Contains(got, "refused") {
			t.Errorf("redactDSN of an error quoting %q = %q", dsn, got)
		}
	}

	// Invalid URLs that carry a password: exit 2 naming the key, without the password.
	for _, dsn := range []string{
		"postgres://attune:" + pw + "@db:port/attune",
		"postgres://attune:" + pw + "@db/attune?sslmode=sometimes",
		"host=db password=" + pw + " sslmode=sometimes",
	} {
		code, _, stderr := runArgs(t, nil, []string{"ATTUNE__DATABASE__URL=" + dsn})
		if code != 2 || !strings.Contains(stderr, "database.url") || strings.Contains(stderr, pw) {
			t.Errorf("database.url %q: exit %d, stderr %q; want 2 naming database.url without the password", dsn, code, stderr)
		}
	}
}

// ---------------------------------------------------------------------------
// Against a real PostgreSQL (ATTUNE_TEST_DATABASE_URL): end to end, faults, fuzzing

// ---------------------------------------------------------------------------
// PostgreSQL plumbing

var pgSeq atomic.Uint64

// pgBaseURL returns ATTUNE_TEST_DATABASE_URL, or skips the test.
func pgBaseURL(t testing.TB) string {
	t.Helper()
	u := os.Getenv("ATTUNE_TEST_DATABASE_URL")
	if u == "" {
		t.Skip("ATTUNE_TEST_DATABASE_URL is not set: skipping the real-PostgreSQL test " +
			"(set it, e.g. to postgres://postgres@127.0.0.1:5432/test?sslmode=disable, to run it)")
	}
	return u
}

// pgUnique returns a lower-case name unique to this process: a channel, an
// entity type or an application_name (all under PostgreSQL's 63-byte limit).
func pgUnique(kind string) string {
	return fmt.Sprintf("pgt_%s_%d_%d", kind, os.Getpid(), pgSeq.Add(1))
}

// pgURL is base with its host replaced by hostport (when not empty) and the
// given application_name.
func pgURL(t testing.TB, base, hostport, app string) string {
	t.Helper()
	u, err := url.Parse(base)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		t.Fatalf("ATTUNE_TEST_DATABASE_URL must be a postgres:// URL (got %q)", base)
	}
	if hostport != "" {
		u.Host = hostport
	}
	q := u.Query()
	q.Set("application_name", app)
	u.RawQuery = q.Encode()
	return u.String()
}

// pgTarget is the host:port of the test database, for the proxy.
func pgTarget(t testing.TB) string {
	t.Helper()
	u, err := url.Parse(pgBaseURL(t))
	if err != nil {
		t.Fatalf("bad ATTUNE_TEST_DATABASE_URL: %v", err)
	}
	host, port := u.Hostname(), u.Port()
	if host == "" {
		host = "127.0.0.1"
	}
	if port == "" {
		port = "5432"
	}
	return net.JoinHostPort(host, port)
}

// pgOpenDB opens the test database for sending NOTIFYs and inspecting pg_stat_activity.
func pgOpenDB(t testing.TB) *sql.DB {
	t.Helper()
	db, err := sql.Open("postgres", pgURL(t, pgBaseURL(t), "", "attune-notifier-test-sql"))
	if err != nil {
		t.Fatalf("open database: %v", err)
	}
	db.SetMaxOpenConns(4)
	t.Cleanup(func() { db.Close() })
	if err := db.Ping(); err != nil {
		t.Fatalf("database at ATTUNE_TEST_DATABASE_URL is unreachable: %v", err)
	}
	return db
}

func pgNotify(t testing.TB, db *sql.DB, channel, payload string) {
	t.Helper()
	if _, err := db.Exec("SELECT pg_notify($1, $2)", channel, payload); err != nil {
		t.Fatalf("pg_notify(%s): %v", channel, err)
	}
}

// pgPayload is a payload shaped like Attune's triggers: entity_type, entity_id, id, then columns.
func pgPayload(entityType string, id int, extra string) string {
	return fmt.Sprintf(`{"entity_type":%q,"entity_id":%d,"id":%d,"status":"running","old_status":"scheduled","action_ref":"core.echo"%s}`,
		entityType, id, id, extra)
}

// pgNotifyRange sends one NOTIFY per id in [from, to], in order, in one statement
// (so one transaction); pad adds bytes to each payload.
func pgNotifyRange(ctx context.Context, db *sql.DB, channel, entityType string, from, to, pad int) error {
	_, err := db.ExecContext(ctx, `SELECT pg_notify($1, json_build_object('entity_type', $2::text, 'entity_id', i,
		'id', i, 'status', 'succeeded', 'pad', repeat('x', $5::int))::text)
		FROM generate_series($3::int, $4::int) AS i ORDER BY i`, channel, entityType, from, to, pad)
	return err
}

// pgListenerPIDs lists the backends whose application_name is app.
func pgListenerPIDs(t testing.TB, db *sql.DB, app string) []int {
	t.Helper()
	rows, err := db.Query("SELECT pid FROM pg_stat_activity WHERE application_name = $1", app)
	if err != nil {
		t.Fatalf("pg_stat_activity: %v", err)
	}
	defer rows.Close()
	var pids []int
	for rows.Next() {
		var pid int
		rows.Scan(&pid)
		pids = append(pids, pid)
	}
	return pids
}

// pgLogger collects a service's log; it is printed when the test fails.
func pgLogger(t testing.TB) *slog.Logger {
	b := &syncBuffer{}
	t.Cleanup(func() { // registered first, so it runs after the service has stopped
		if t.Failed() {
			t.Logf("service log:\n%s", b.String())
		}
	})
	return slog.New(slog.NewTextHandler(b, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// ---------------------------------------------------------------------------
// A Service with a real pq listener, wired as run() wires it, behind httptest.

type pgOptions struct {
	dbHost     string        // connect here instead of the URL's host (a pgProxy)
	channels   []string      // notifier.channels; nil: the defaults
	watchEvery time.Duration // watchListener's interval; 0: one second
	mutate     func(*Config)
}

type pgService struct {
	*served
	app  string // the listener's application_name
	stop func() // shuts the service down as run() does; idempotent
}

func newPGService(t testing.TB, o pgOptions) *pgService {
	t.Helper()
	base := pgBaseURL(t)
	log := pgLogger(t)
	app := pgUnique("app")
	cfg := testConfig()
	cfg.Database.URL = pgURL(t, base, o.dbHost, app)
	cfg.Database.ReconnectMinInterval = 50 * time.Millisecond
	cfg.Database.ReconnectMaxInterval = 250 * time.Millisecond
	if o.channels != nil {
		cfg.Notifier.Channels = o.channels
	}
	if o.mutate != nil {
		o.mutate(&cfg)
	}
	every := o.watchEvery
	if every == 0 {
		every = time.Second
	}
	svc := newService(cfg, log)
	l := newPGListener(cfg.Database, svc.onListenerEvent)
	ctx, cancel := context.WithCancel(context.Background())
	listenerDone := make(chan struct{})
	go func() { defer close(listenerDone); svc.runListener(ctx, l) }()
	watchDone := make(chan struct{})
	go func() { defer close(watchDone); svc.watchListener(ctx, l, every) }()

	p := &pgService{served: serve(t, svc), app: app}
	srv := p.srv
	var once sync.Once
	p.stop = func() {
		once.Do(func() {
			cancel()
			svc.shutdown(srv.Config, l, listenerDone)
			<-watchDone
			srv.Close()
		})
	}
	t.Cleanup(p.stop)
	return p
}

// health returns /health's status code (0 when the request fails).
func (p *pgService) health() (int, string) {
	resp, err := http.Get(p.srv.URL + "/health")
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// waitHealth waits (generously) until /health answers code.
func (p *pgService) waitHealth(code int) {
	p.t.Helper()
	var last string
	pgWaitFor(p.t, fmt.Sprintf("/health %d", code), 20*time.Second, func() bool {
		got, body := p.health()
		last = body
		return got == code
	}, func() string { return "last /health: " + last })
}

// pgWaitFor is waitFor with a chosen deadline and an optional explanation.
func pgWaitFor(t testing.TB, what string, d time.Duration, cond func() bool, explain func() string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			msg := ""
			if explain != nil {
				msg = ": " + explain()
			}
			t.Fatalf("timed out after %s waiting for %s%s", d, what, msg)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// pgID is the payload's "id" of a notification frame, or -1.
func pgID(m map[string]any) int {
	if m["type"] != "notification" {
		return -1
	}
	p, _ := m["payload"].(map[string]any)
	id, ok := p["id"].(float64)
	if !ok {
		return -1
	}
	return int(id)
}

// pgExpectID reads one frame and checks it is the notification with the given id.
func pgExpectID(t testing.TB, c *wsClient, id int) map[string]any {
	t.Helper()
	m := c.read()
	if got := pgID(m); got != id {
		t.Fatalf("got frame %v, want the notification with id %d", m, id)
	}
	return m
}

// pgGoroutines counts goroutines once idle HTTP connections are gone.
func pgGoroutines() int {
	http.DefaultClient.CloseIdleConnections()
	return runtime.NumGoroutine()
}

// pgNoLeaks waits until the goroutine count is back to baseline (with a small
// tolerance for the runtime and the database pool).
func pgNoLeaks(t testing.TB, baseline int) {
	t.Helper()
	var n int
	pgWaitFor(t, "goroutines to return to the baseline", 15*time.Second, func() bool {
		n = pgGoroutines()
		return n <= baseline+3
	}, func() string {
		buf := make([]byte, 1<<20)
		return fmt.Sprintf("%d goroutines, baseline %d\n%s", n, baseline, buf[:runtime.Stack(buf, true)])
	})
}

// ---------------------------------------------------------------------------
// A TCP proxy between the notifier and PostgreSQL, to simulate faults.

type pgProxy struct {
	ln     net.Listener
	target string

	mu     sync.Mutex
	down   bool // new connections are reset at once
	closed bool
	conns  map[*pgProxyConn]struct{}
	wg     sync.WaitGroup
}

type pgProxyConn struct {
	client, server net.Conn
	blackhole      atomic.Bool // bytes are read and discarded, nothing is closed
	once           sync.Once
}

func (pc *pgProxyConn) close() {
	pc.once.Do(func() { pc.client.Close(); pc.server.Close() })
}

func newPGProxy(t testing.TB, target string) *pgProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("proxy: %v", err)
	}
	p := &pgProxy{ln: ln, target: target, conns: map[*pgProxyConn]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

func (p *pgProxy) addr() string { return p.ln.Addr().String() }

func (p *pgProxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		down := p.down
		p.mu.Unlock()
		if down { // as if nothing listened: reset
			c.(*net.TCPConn).SetLinger(0)
			c.Close()
			continue
		}
		s, err := net.DialTimeout("tcp", p.target, 5*time.Second)
		if err != nil {
			c.Close()
			continue
		}
		pc := &pgProxyConn{client: c, server: s}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			pc.close()
			return
		}
		p.conns[pc] = struct{}{}
		p.wg.Add(2)
		p.mu.Unlock()
		go p.pipe(pc, c, s)
		go p.pipe(pc, s, c)
	}
}

func (p *pgProxy) pipe(pc *pgProxyConn, src, dst net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !pc.blackhole.Load() {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				break
			}
		}
		if err != nil {
			break
		}
	}
	pc.close()
	p.mu.Lock()
	delete(p.conns, pc)
	p.mu.Unlock()
}

// setDown makes new connections fail (true) or succeed (false); existing ones are untouched.
func (p *pgProxy) setDown(down bool) {
	p.mu.Lock()
	p.down = down
	p.mu.Unlock()
}

// cut closes every proxied connection, as a network outage or a server restart would.
func (p *pgProxy) cut() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	for pc := range p.conns {
		pc.close()
	}
	return len(p.conns)
}

// blackholeAll makes every current connection silently dead: bytes stop
// flowing in both directions, but neither side sees a FIN or a reset.
func (p *pgProxy) blackholeAll() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	for pc := range p.conns {
		pc.blackhole.Store(true)
	}
	return len(p.conns)
}

func (p *pgProxy) close() {
	p.ln.Close()
	p.mu.Lock()
	p.closed = true
	for pc := range p.conns {
		pc.close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// ---------------------------------------------------------------------------
// End to end: SQL NOTIFY -> real pq.Listener -> real WebSocket client

func TestPGAllDefaultChannels(t *testing.T) {
	p := newPGService(t, pgOptions{})
	db := pgOpenDB(t)
	p.waitHealth(http.StatusOK)
	et := pgUnique("et")
	c := dial(t, p.wsURL())
	c.subscribe("entity_type:" + et)
	channels := defaultConfig().Notifier.Channels
	if len(channels) != 7 {
		t.Fatalf("want seven default channels, got %v", channels)
	}
	for i, ch := range channels {
		pgNotify(t, db, ch, pgPayload(et, i+1, ""))
	}
	for i, ch := range channels {
		m := pgExpectID(t, c, i+1)
		if m["notification_type"] != ch || m["entity_type"] != et || m["entity_id"] != float64(i+1) || m["user_id"] != nil {
			t.Fatalf("channel %s: got %v", ch, m)
		}
		if ts, _ := m["timestamp"].(string); !strings.HasSuffix(ts, "Z") {
			t.Fatalf("timestamp %q is not RFC 3339 UTC", ts)
		}
	}
	if got := p.stat("notifications_received"); got < 7 {
		t.Fatalf("notifications_received = %v, want >= 7", got)
	}
}

func TestPGFilterKinds(t *testing.T) {
	chA, chB := pgUnique("cha"), pgUnique("chb")
	p := newPGService(t, pgOptions{channels: []string{chA, chB}})
	db := pgOpenDB(t)
	p.waitHealth(http.StatusOK)
	et1, et2 := pgUnique("et"), pgUnique("et")
	user := 1_000_000 + os.Getpid()

	type sub struct {
		filters []string
		want    []int
	}
	subs := map[string]sub{
		"all":               {[]string{"all"}, []int{1, 2, 3, 4, 5, 6, 7, 8}},
		"entity_type":       {[]string{"entity_type:" + et1}, []int{1, 2, 8}},
		"entity":            {[]string{"entity:" + et1 + ":42"}, []int{1, 8}},
		"user":              {[]string{"user:" + strconv.Itoa(user)}, []int{4, 8}},
		"notification_type": {[]string{"notification_type:" + chB}, []int{6, 8}},
		"overlapping":       {[]string{"entity_type:" + et1, "entity:" + et1 + ":42", "user:" + strconv.Itoa(user)}, []int{1, 2, 4, 8}},
		"none":              {nil, nil},
	}
	clients := map[string]*wsClient{}
	for name, s := range subs {
		c := dial(t, p.wsURL())
		for _, f := range s.filters {
			c.subscribe(f)
		}
		clients[name] = c
	}
	sends := []struct {
		channel, et string
		entityID    int
		user        string // raw JSON, "" for none
	}{
		1: {chA, et1, 42, ""},
		2: {chA, et1, 43, ""},                               // entity: other id
		3: {chA, et2, 42, ""},                               // entity: same id, other type
		4: {chA, et2, 1, strconv.Itoa(user)},                // user
		5: {chA, et2, 2, strconv.Itoa(user + 1)},            // user: other user
		6: {chB, et2, 3, ""},                                // notification_type
		7: {chA, et2, 4, strconv.Quote(strconv.Itoa(user))}, // user_id as a string is no user
		8: {chB, et1, 42, strconv.Itoa(user)},               // matches every filter: the end marker
	}
	for id := 1; id < len(sends); id++ {
		s := sends[id]
		extra := ""
		if s.user != "" {
			extra = `,"user_id":` + s.user
		}
		pgNotify(t, db, s.channel, fmt.Sprintf(`{"entity_type":%q,"entity_id":%d,"id":%d,"status":"requested"%s}`, s.et, s.entityID, id, extra))
	}
	for name, s := range subs {
		c := clients[name]
		if s.want == nil {
			c.expectSilence(300 * time.Millisecond)
			continue
		}
		var got []int
		for len(got) == 0 || got[len(got)-1] != 8 {
			m := c.read()
			id := pgID(m)
			got = append(got, id)
			var want any // user_id: null unless the payload's is an integer
			if id >= 1 && id < len(sends) && sends[id].user != "" && sends[id].user[0] != '"' {
				n, _ := strconv.Atoi(sends[id].user)
				want = float64(n)
			}
			if m["user_id"] != want {
				t.Fatalf("%s: notification %d has user_id %v, want %v", name, id, m["user_id"], want)
			}
		}
		if fmt.Sprint(got) != fmt.Sprint(s.want) {
			t.Errorf("client %q (filters %q) received %v, want %v", name, s.filters, got, s.want)
		}
	}
}

func TestPGTransactionOf500InOrder(t *testing.T) {
	ch := pgUnique("ch")
	p := newPGService(t, pgOptions{channels: []string{ch}})
	db := pgOpenDB(t)
	p.waitHealth(http.StatusOK)
	et := pgUnique("et")
	c := dial(t, p.wsURL())
	c.subscribe("entity_type:" + et)
	tx, err := db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 500; i++ {
		if _, err := tx.Exec("SELECT pg_notify($1, $2)", ch, pgPayload(et, i, "")); err != nil {
			t.Fatal(err)
		}
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 500; i++ {
		m := pgExpectID(t, c, i)
		if m["entity_id"] != float64(i) || m["notification_type"] != ch {
			t.Fatalf("notification %d: %v", i, m)
		}
	}
	c.expectSilence(200 * time.Millisecond)
}

func TestPGLargeNonASCIIPayloadIntact(t *testing.T) {
	ch := pgUnique("ch")
	p := newPGService(t, pgOptions{channels: []string{ch}})
	db := pgOpenDB(t)
	p.waitHealth(http.StatusOK)
	et := pgUnique("et")
	c := dial(t, p.wsURL())
	c.subscribe("entity:" + et + ":77")

	const size = 7900
	var b strings.Builder
	b.WriteString(`{"entity_type":"` + et + `","entity_id":77,"id":77,"status":"failed","result":"`)
	pieces := []string{"Grüße, ", "日本語のテキスト ", "emoji 🚀🔥 ", `escaped \"quote\" \\ \n \u00e9 \ud83d\ude80 `, "ñandú ", "Ωμέγα "}
	const tail = `","action_ref":"core.local"}`
	for i := 0; ; i++ {
		piece := pieces[i%len(pieces)]
		if b.Len()+len(piece)+len(tail) > size {
			break
		}
		b.WriteString(piece)
	}
	b.WriteString(strings.Repeat("x", size-b.Len()-len(tail)))
	b.WriteString(tail)
	payload := b.String()
	if len(payload) != size || !json.Valid([]byte(payload)) || !utf8.ValidString(payload) {
		t.Fatalf("test payload: %d bytes, valid JSON %v", len(payload), json.Valid([]byte(payload)))
	}
	pgNotify(t, db, ch, payload)
	raw := c.readRaw()
	var got struct {
		Type    string          `json:"type"`
		Payload json.RawMessage `json:"payload"`
	}
	if err := json.Unmarshal([]byte(raw), &got); err != nil || got.Type != "notification" {
		t.Fatalf("frame is not a notification (%v): %.200s", err, raw)
	}
	if string(got.Payload) != payload {
		t.Fatalf("payload changed on the way (%d bytes sent, %d received)", len(payload), len(got.Payload))
	}
}

func TestPGBadPayloadsDroppedNextDelivered(t *testing.T) {
	ch := pgUnique("ch")
	p := newPGService(t, pgOptions{channels: []string{ch}})
	db := pgOpenDB(t)
	p.waitHealth(http.StatusOK)
	c := dial(t, p.wsURL())
	c.subscribe("all") // only our unique channel is LISTENed
	bad := []string{
		``,
		`not json`,
		`[{"entity_type":"execution","entity_id":1}]`,
		`"execution"`,
		`{"entity_type":"execution"}`,
		`{"entity_id":1}`,
		`{"entity_type":5,"entity_id":1}`,
		`{"entity_type":"execution","entity_id":"1"}`,
		`{"entity_type":"execution","entity_id":1.5}`,
		`{"entity_type":"execution","entity_id":1e3}`,
		`{"entity_type":"execution","entity_id":99999999999999999999}`,
		`{"entity_type":"execution","entity_id":1,}`,
		`{"entity_type":"execution","entity_id":1} {"x":1}`,
		`{"entity_type":null,"entity_id":1}`,
	}
	for _, payload := range bad {
		pgNotify(t, db, ch, payload)
	}
	pgNotify(t, db, ch, pgPayload("execution", 9, ""))
	pgExpectID(t, c, 9)
	if got := p.stat("notifications_dropped"); got != float64(len(bad)) {
		t.Fatalf("notifications_dropped = %v, want %d", got, len(bad))
	}
	if got := p.stat("notifications_received"); got != float64(len(bad)+1) {
		t.Fatalf("notifications_received = %v, want %d", got, len(bad)+1)
	}
}

func TestPGTwoServicesBothDeliver(t *testing.T) {
	ch := pgUnique("ch")
	a := newPGService(t, pgOptions{channels: []string{ch}})
	b := newPGService(t, pgOptions{channels: []string{ch}})
	db := pgOpenDB(t)
	a.waitHealth(http.StatusOK)
	b.waitHealth(http.StatusOK)
	var clients []*wsClient
	for _, p := range []*pgService{a, b} {
		for range 2 {
			c := dial(t, p.wsURL())
			c.subscribe("all")
			clients = append(clients, c)
		}
	}
	const n = 200
	if err := pgNotifyRange(context.Background(), db, ch, "execution", 1, n, 0); err != nil {
		t.Fatal(err)
	}
	for i, c := range clients {
		for id := 1; id <= n; id++ {
			if m := c.read(); pgID(m) != id {
				t.Fatalf("client %d (service %c): got %v, want notification %d", i, "ab"[i/2], m, id)
			}
		}
	}
}

// ---------------------------------------------------------------------------
// Faults

// TestPGTerminateBackendResync kills the listener's backend while the database
// stays unreachable for a while, then lets it reconnect.
func TestPGTerminateBackendResync(t *testing.T) {
	ch := pgUnique("ch")
	px := newPGProxy(t, pgTarget(t))
	p := newPGService(t, pgOptions{dbHost: px.addr(), channels: []string{ch}})
	db := pgOpenDB(t)
	p.waitHealth(http.StatusOK)
	sub := dial(t, p.wsURL())
	sub.subscribe("all")
	idle := dial(t, p.wsURL()) // no filters: receives nothing but the resync
	pgNotify(t, db, ch, pgPayload("execution", 1, ""))
	pgExpectID(t, sub, 1)

	pids := pgListenerPIDs(t, db, p.app)
	if len(pids) != 1 {
		t.Fatalf("want exactly one backend with application_name %s, got %v", p.app, pids)
	}
	px.setDown(true) // keep the outage visible: reconnection attempts fail
	var ok bool
	if err := db.QueryRow("SELECT pg_terminate_backend($1)", pids[0]).Scan(&ok); err != nil || !ok {
		t.Fatalf("pg_terminate_backend(%d) = %v, %v", pids[0], ok, err)
	}
	p.waitHealth(http.StatusServiceUnavailable)
	if st := p.stats(); st["listener_connected"] != false {
		t.Fatalf("/stats while disconnected: listener_connected = %v", st["listener_connected"])
	}
	pgNotify(t, db, ch, pgPayload("execution", 2, "")) // lost: nobody LISTENs
	px.setDown(false)
	p.waitHealth(http.StatusOK)

	for _, c := range []*wsClient{sub, idle} {
		if m := c.read(); m["type"] != "resync" || m["reason"] == "" || m["reason"] == nil {
			t.Fatalf("after reconnecting: got %v, want a resync", m)
		}
	}
	pgNotify(t, db, ch, pgPayload("execution", 3, ""))
	pgExpectID(t, sub, 3)
	idle.expectSilence(200 * time.Millisecond)
	if got := p.stat("listener_reconnects"); got < 1 {
		t.Fatalf("listener_reconnects = %v, want >= 1", got)
	}
	if now := pgListenerPIDs(t, db, p.app); len(now) != 1 || now[0] == pids[0] {
		t.Fatalf("after reconnecting: backends %v (old %d), want one new backend", now, pids[0])
	}
}

func TestPGDatabaseUnreachableAtStart(t *testing.T) {
	ch := pgUnique("ch")
	px := newPGProxy(t, pgTarget(t))
	px.setDown(true)
	p := newPGService(t, pgOptions{dbHost: px.addr(), channels: []string{ch}})
	db := pgOpenDB(t)
	pgWaitFor(t, "a failed connection attempt", 10*time.Second, func() bool {
		code, body := p.health()
		return code == http.StatusServiceUnavailable && strings.Contains(body, "cannot connect")
	}, nil)
	// The WebSocket side works while the database is down.
	c := dial(t, p.wsURL())
	c.subscribe("entity_type:execution")
	if st := p.stats(); st["listener_connected"] != false || st["connected_clients"] != 1.0 {
		t.Fatalf("/stats while the database is down: %v", st)
	}
	px.setDown(false)
	p.waitHealth(http.StatusOK)
	pgNotify(t, db, ch, pgPayload("execution", 5, ""))
	m := c.read()
	if m["type"] == "resync" { // allowed, not required, after a first connection
		m = c.read()
	}
	if pgID(m) != 5 {
		t.Fatalf("got %v, want notification 5", m)
	}
}

// TestPGProxyOutageMidStream cuts the listener's TCP connection while
// notifications are flowing: the stream must resume, in order, after a resync.
func TestPGProxyOutageMidStream(t *testing.T) {
	ch := pgUnique("ch")
	px := newPGProxy(t, pgTarget(t))
	p := newPGService(t, pgOptions{dbHost: px.addr(), channels: []string{ch}})
	db := pgOpenDB(t)
	p.waitHealth(http.StatusOK)
	c := dial(t, p.wsURL())
	c.subscribe("all")

	ctx, cancel := context.WithCancel(context.Background())
	flood := make(chan error, 1)
	go func() {
		for i := 1; ; i++ {
			if ctx.Err() != nil {
				flood <- nil
				return
			}
			if _, err := db.ExecContext(ctx, "SELECT pg_notify($1, $2)", ch, pgPayload("execution", i, "")); err != nil && ctx.Err() == nil {
				flood <- err
				return
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	defer func() { cancel(); <-flood }()

	last, before, after, resyncs := 0, 0, 0, 0
	var cutAt time.Time
	for after < 50 {
		if !cutAt.IsZero() && time.Since(cutAt) > 15*time.Second {
			t.Fatalf("15s after the cut: %d resyncs, %d notifications after one (%d before the cut)", resyncs, after, before)
		}
		m := c.read()
		if m["type"] == "resync" {
			resyncs++
			continue
		}
		id := pgID(m)
		if id <= last {
			t.Fatalf("notification %d after %d: out of order or duplicated", id, last)
		}
		last = id
		if resyncs == 0 {
			if before++; before == 50 {
				cutAt = time.Now()
				if n := px.cut(); n != 1 {
					t.Fatalf("cut %d proxied connections, want 1", n)
				}
			}
		} else {
			after++
		}
	}
	cancel()
	if err := <-flood; err != nil {
		t.Fatalf("sending notifications: %v", err)
	}
	flood <- nil
	if resyncs != 1 {
		t.Fatalf("got %d resyncs, want 1", resyncs)
	}
	if got := p.stat("listener_reconnects"); got < 1 {
		t.Fatalf("listener_reconnects = %v, want >= 1", got)
	}
}

// TestPGSilentlyDeadListener makes the listener's TCP session silently dead:
// no FIN, no reset, nothing arrives. Only the ping watchdog can notice.
func TestPGSilentlyDeadListener(t *testing.T) {
	ch := pgUnique("ch")
	px := newPGProxy(t, pgTarget(t))
	p := newPGService(t, pgOptions{dbHost: px.addr(), channels: []string{ch}, watchEvery: 100 * time.Millisecond,
		mutate: func(c *Config) { c.Database.PingTimeout = 500 * time.Millisecond }})
	db := pgOpenDB(t)
	p.waitHealth(http.StatusOK)
	c := dial(t, p.wsURL())
	c.subscribe("all")
	pgNotify(t, db, ch, pgPayload("execution", 1, ""))
	pgExpectID(t, c, 1)

	if n := px.blackholeAll(); n != 1 {
		t.Fatalf("blackholed %d proxied connections, want 1", n)
	}
	op, frame, err := c.readFrame(15 * time.Second)
	if err != nil || op != websocket.TextFrame || !strings.Contains(string(frame), `"type":"resync"`) {
		t.Fatalf("after the listener's connection went silent: got %q, %v; want a resync", frame, err)
	}
	p.waitHealth(http.StatusOK)
	pgNotify(t, db, ch, pgPayload("execution", 2, ""))
	pgExpectID(t, c, 2)
	if got := p.stat("listener_reconnects"); got < 1 {
		t.Fatalf("listener_reconnects = %v, want >= 1", got)
	}
	// The dead session's backend goes away once the notifier dropped its socket.
	pgWaitFor(t, "one backend for the listener", 10*time.Second, func() bool {
		return len(pgListenerPIDs(t, db, p.app)) == 1
	}, nil)
}

// pgClientIDs lists the client_ids the hub has registered.
func pgClientIDs(p *pgService) map[string]bool {
	h := p.svc.hub
	h.mu.Lock()
	defer h.mu.Unlock()
	ids := map[string]bool{}
	for c := range h.clients {
		ids[c.id] = true
	}
	return ids
}

// pgDialSmallWindow connects like dial, with a 4 kB receive buffer set before
// the connection exists, so that a client that stops reading makes the
// server's writes block after little data.
func pgDialSmallWindow(t testing.TB, wsURL string) *wsClient {
	t.Helper()
	u, _ := url.Parse(wsURL)
	d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
	}}
	conn, err := d.Dial("tcp", u.Host)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	req, _ := http.NewRequest("GET", "http://"+u.Host+u.Path, nil)
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
	req.Header.Set("Sec-WebSocket-Version", "13")
	c := &wsClient{t: t, conn: conn, br: bufio.NewReader(conn)}
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if err := req.Write(conn); err != nil {
		t.Fatalf("handshake: %v", err)
	}
	if resp, err := http.ReadResponse(c.br, req); err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("handshake: %v %v", resp, err)
	}
	m := c.read()
	if m["type"] != "welcome" {
		t.Fatalf("first frame %v, want a welcome", m)
	}
	c.id, _ = m["client_id"].(string)
	return c
}

// pgReadIDs reads notifications and checks that their payload ids are
// 1, 2, 3... until the one whose entity_type is "final"; it returns how many
// numbered ones arrived and the longest wait between two of them. Safe in any goroutine.
func pgReadIDs(c *wsClient, timeout time.Duration, progress *atomic.Int64) (int, time.Duration, error) {
	next := 1
	var last time.Time
	var gap time.Duration
	for {
		op, p, err := c.readFrame(timeout)
		if now := time.Now(); next > 1 {
			gap = max(gap, now.Sub(last))
			last = now
		} else {
			last = now
		}
		if err == nil && op == websocket.CloseFrame {
			err = fmt.Errorf("closed by the server: %d %q", binary.BigEndian.Uint16(append(p, 0, 0)), p[min(len(p), 2):])
		}
		if err != nil {
			return next - 1, gap, fmt.Errorf("after notification %d: %v", next-1, err)
		}
		var m struct {
			Type       string `json:"type"`
			EntityType string `json:"entity_type"`
			Payload    struct {
				ID int `json:"id"`
			} `json:"payload"`
		}
		if err := json.Unmarshal(p, &m); err != nil || m.Type != "notification" {
			return next - 1, gap, fmt.Errorf("after notification %d: got %.200q (%v)", next-1, p, err)
		}
		if m.EntityType == "final" {
			return next - 1, gap, nil
		}
		if m.Payload.ID != next {
			return next - 1, gap, fmt.Errorf("got notification %d, want %d", m.Payload.ID, next)
		}
		if progress != nil {
			progress.Store(int64(next))
		}
		next++
	}
}

// TestPGBadClientsUnderFlood puts a stalled reader, clients that reset their
// connection mid-stream and a half-open client next to healthy clients while
// notifications pour in: the healthy ones must get every notification in
// order, the others must be disconnected in bounded time, and nothing leaks.
func TestPGBadClientsUnderFlood(t *testing.T) {
	// The stalled client's writer is stuck for writeTimeout: a design where
	// that holds up anyone else shows as a gap that long for healthy clients.
	const writeTimeout, maxGap = 5 * time.Second, 2500 * time.Millisecond
	ch := pgUnique("ch")
	p := newPGService(t, pgOptions{channels: []string{ch}, mutate: func(c *Config) {
		c.Notifier.PingInterval = time.Second // a healthy client's pong may queue behind a flood
		c.Notifier.WriteTimeout = writeTimeout
	}})
	db := pgOpenDB(t)
	p.waitHealth(http.StatusOK)
	baseline := pgGoroutines()

	const healthyN = 3
	type result struct {
		count int
		gap   time.Duration
		err   error
	}
	healthy := make([]*wsClient, healthyN)
	results := make(chan result, healthyN)
	for i := range healthy {
		healthy[i] = dial(t, p.wsURL())
		healthy[i].subscribe("all")
	}
	stalled := pgDialSmallWindow(t, p.wsURL()) // reads nothing, ever
	stalled.subscribe("all")
	var rst []*wsClient // read a little, then reset the connection
	for range 2 {
		c := dial(t, p.wsURL())
		c.subscribe("all")
		rst = append(rst, c)
	}
	halfOpen := dial(t, p.wsURL())         // neither reads nor answers pings
	halfOpen.subscribe("entity:nothing:1") // never matched: only the keep-alive can find it dead
	bad := []*wsClient{stalled, rst[0], rst[1], halfOpen}
	if ids := pgClientIDs(p); len(ids) != healthyN+len(bad) {
		t.Fatalf("registered clients %v, want %d", ids, healthyN+len(bad))
	}

	progress := make([]atomic.Int64, healthyN) // notifications each healthy client has read
	for i, c := range healthy {
		go func() {
			n, gap, err := pgReadIDs(c, 20*time.Second, &progress[i])
			results <- result{n, gap, err}
		}()
	}
	slowest := func() int64 {
		m := progress[0].Load()
		for i := range progress {
			m = min(m, progress[i].Load())
		}
		return m
	}

	// The flood: batches of 100 NOTIFYs of about 1 kB, as fast as healthy
	// clients can take them (at most two batches ahead of the slowest, so
	// their queues never overflow even on a loaded machine), until the
	// bad clients are gone.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	const batch = 100
	sent := make(chan int, 1)
	floodErr := make(chan error, 1)
	go func() {
		defer close(floodErr)
		n := 0
		for ctx.Err() == nil && n < 100_000 {
			if err := pgNotifyRange(context.Background(), db, ch, "execution", n+1, n+batch, 1000); err != nil {
				floodErr <- err
				break
			}
			n += batch
			for ctx.Err() == nil && slowest() < int64(n-batch) {
				time.Sleep(time.Millisecond)
			}
		}
		sent <- n
	}()

	for _, c := range rst {
		for range 5 {
			c.readRaw()
		}
		c.conn.(*net.TCPConn).SetLinger(0)
		c.conn.Close()
	}
	start := time.Now()
	var left []string
	gone := map[string]time.Duration{}
	pgWaitFor(t, "the stalled, reset and half-open clients to be disconnected", 30*time.Second, func() bool {
		ids := pgClientIDs(p)
		for _, c := range healthy {
			if !ids[c.id] {
				t.Fatalf("healthy client %s was disconnected (slow consumers: %v)", c.id, p.stat("slow_consumer_disconnects"))
			}
		}
		left = left[:0]
		for _, c := range bad {
			if ids[c.id] {
				left = append(left, c.id)
			} else if _, ok := gone[c.id]; !ok {
				gone[c.id] = time.Since(start).Round(time.Millisecond)
			}
		}
		return len(left) == 0
	}, func() string { return fmt.Sprintf("still connected: %v; /stats %v", left, p.stats()) })
	t.Logf("disconnected after: stalled %s, reset %s and %s, half-open %s",
		gone[stalled.id], gone[rst[0].id], gone[rst[1].id], gone[halfOpen.id])
	cancel()
	n := <-sent
	if err := <-floodErr; err != nil {
		t.Fatalf("sending notifications: %v", err)
	}
	if err := pgNotifyRange(context.Background(), db, ch, "final", n+1, n+1, 0); err != nil {
		t.Fatal(err)
	}
	for range healthyN {
		select {
		case r := <-results:
			if r.err != nil || r.count != n {
				t.Fatalf("a healthy client received %d of %d notifications in order: %v", r.count, n, r.err)
			}
			if r.gap > maxGap {
				t.Errorf("a healthy client waited %s between two notifications: held up by a bad client", r.gap)
			}
			t.Logf("healthy client: longest wait between notifications %s", r.gap.Round(time.Millisecond))
		case <-time.After(60 * time.Second):
			t.Fatalf("healthy clients did not receive all %d notifications", n)
		}
	}
	t.Logf("%d notifications of ~1 kB each; slow consumers %v", n, p.stat("slow_consumer_disconnects"))

	// The half-open client was closed by the keep-alive.
	if code, reason := halfOpen.closeCode(); code != 1001 || !strings.Contains(reason, "keep-alive") {
		t.Errorf("half-open client: close %d %q, want 1001 keep-alive timeout", code, reason)
	}

	for _, c := range healthy {
		c.conn.Close()
	}
	halfOpen.conn.Close()
	stalled.conn.Close()
	pgWaitFor(t, "every client to be gone", 10*time.Second, func() bool { return len(pgClientIDs(p)) == 0 }, nil)
	pgNoLeaks(t, baseline)
}

// TestPGShutdownUnderLoad runs the whole program (run) with 1,000 clients and
// notifications flowing, then cancels its context as SIGTERM does.
func TestPGShutdownUnderLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("1,000 clients: skipped with -short")
	}
	ch := pgUnique("ch")
	app := pgUnique("app")
	dbURL := pgURL(t, pgBaseURL(t), "", app)
	db := pgOpenDB(t)
	baseline := pgGoroutines()
	const shutdownTimeout = 10 * time.Second

	stderr := &syncBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("run() output:\n%s", stderr.String())
		}
	})
	addr, code, cancel := pgStartRun(t, stderr, []string{
		"ATTUNE__DATABASE__URL=" + dbURL,
		"ATTUNE__DATABASE__RECONNECT_MIN_INTERVAL=100ms",
		"ATTUNE__NOTIFIER__CHANNELS=" + ch,
		"ATTUNE__NOTIFIER__SHUTDOWN_TIMEOUT=" + shutdownTimeout.String(),
		"ATTUNE__LOG__LEVEL=warn",
	})
	defer cancel()

	const n = 1000
	url := "ws://" + addr + "/ws"
	clients := make([]*wsClient, n)
	for i := range clients {
		clients[i] = dial(t, url)
		if i%2 == 0 {
			clients[i].subscribe("all")
		}
	}
	codes := make(chan int, n)
	received := make(chan int, n)
	for _, c := range clients {
		go func() {
			got := 0
			for {
				op, p, err := c.readFrame(30 * time.Second)
				if err != nil {
					codes <- 0
					received <- got
					return
				}
				switch op {
				case websocket.TextFrame:
					got++
				case websocket.CloseFrame:
					c.writeFrame(websocket.CloseFrame, p[:min(len(p), 2)]) // as a browser replies
					c.conn.Close()
					code := 1005
					if len(p) >= 2 {
						code = int(binary.BigEndian.Uint16(p))
					}
					codes <- code
					received <- got
					return
				}
			}
		}()
	}

	floodCtx, stopFlood := context.WithCancel(context.Background())
	flood := make(chan error, 1)
	go func() {
		for i := 1; floodCtx.Err() == nil; i += 5 {
			if err := pgNotifyRange(floodCtx, db, ch, "execution", i, i+4, 0); err != nil && floodCtx.Err() == nil {
				flood <- err
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		flood <- nil
	}()
	defer func() { stopFlood(); <-flood }()
	// Let notifications flow to every subscribed client first.
	pgWaitFor(t, "notifications to flow", 20*time.Second, func() bool {
		_, st := getJSON(t, "http://"+addr+"/stats")
		d, _ := st["notifications_delivered"].(float64)
		return d >= 5*n
	}, nil)

	start := time.Now()
	cancel() // SIGTERM
	var exit int
	select {
	case exit = <-code:
	case <-time.After(shutdownTimeout + 5*time.Second):
		t.Fatalf("run did not return within %s of the shutdown", shutdownTimeout+5*time.Second)
	}
	elapsed := time.Since(start)
	if exit != 0 {
		t.Fatalf("run exited with %d, want 0", exit)
	}
	if elapsed > shutdownTimeout {
		t.Fatalf("shutdown took %s, more than notifier.shutdown_timeout %s", elapsed, shutdownTimeout)
	}
	bad := map[int]int{}
	total := 0
	for range n {
		if c := <-codes; c != 1001 {
			bad[c]++
		}
		total += <-received
	}
	if len(bad) > 0 {
		t.Fatalf("clients not closed with 1001: %v (by close code; 0 = no close frame)", bad)
	}
	t.Logf("shutdown of %d clients took %s; %d notifications received before it", n, elapsed.Round(time.Millisecond), total)
	stopFlood()
	if err := <-flood; err != nil {
		t.Fatalf("sending notifications: %v", err)
	}
	flood <- nil
	for _, c := range clients {
		c.conn.Close()
	}
	pgNoLeaks(t, baseline)
	pgWaitFor(t, "the listener's backend to go away", 10*time.Second, func() bool {
		return len(pgListenerPIDs(t, db, app)) == 0
	}, nil)
}

// pgStartRun runs the whole program on a free loopback port with env and waits
// until /health is 200. It returns the address, run's exit code channel and
// the cancel function that plays SIGTERM.
func pgStartRun(t testing.TB, stderr io.Writer, env []string) (string, <-chan int, context.CancelFunc) {
	t.Helper()
attempts:
	for attempt := 1; ; attempt++ {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		_, port, _ := net.SplitHostPort(addr)
		env := append([]string{"ATTUNE__NOTIFIER__HOST=127.0.0.1", "ATTUNE__NOTIFIER__PORT=" + port}, env...)
		ctx, cancel := context.WithCancel(context.Background())
		code := make(chan int, 1)
		go func() { code <- run(ctx, []string{"--config", os.DevNull}, env, io.Discard, stderr) }()
		deadline := time.Now().Add(20 * time.Second)
		for {
			select {
			case c := <-code:
				cancel()
				if attempt < 3 { // the port was taken meanwhile: try another
					t.Logf("run exited with %d; retrying on another port", c)
					continue attempts
				}
				t.Fatalf("run exited with %d before serving", c)
			default:
			}
			if resp, err := http.Get("http://" + addr + "/health"); err == nil {
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					return addr, code, cancel
				}
			}
			if time.Now().After(deadline) {
				cancel()
				t.Fatalf("service at %s did not become healthy", addr)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// ---------------------------------------------------------------------------
// Fuzz targets. `go test` runs the seeds; `go test -fuzz '^FuzzX$'` explores.

// pgMarshal is the JSON of a server reply, as its frame carries it.
func pgMarshal(r reply) []byte {
	b, _ := json.Marshal(r)
	return b
}

// pgMatchingFilters is n.matchingFilters() as a slice.
func pgMatchingFilters(n *Notification) []Filter {
	fs, k := n.matchingFilters()
	return fs[:k]
}

var pgFuzzNow = time.Date(2026, 3, 4, 5, 6, 7, 890123000, time.UTC)

func FuzzParseNotification(f *testing.F) {
	seeds := []struct{ channel, payload string }{
		{"execution_status_changed", `{"entity_type":"execution","entity_id":123,"id":123,"status":"running","old_status":"scheduled","action_ref":"core.echo"}`},
		{"execution_created", `{"entity_type":"execution","entity_id":124,"id":124,"status":"requested","action_ref":"core.http","parent":null,"enforcement":7}`},
		{"inquiry_created", `{"entity_type":"inquiry","entity_id":5,"id":5,"execution":124,"status":"pending","user_id":42}`},
		{"inquiry_responded", `{"entity_type":"inquiry","entity_id":5,"id":5,"status":"responded","response":{"approved":true}}`},
		{"enforcement_created", `{"entity_type":"enforcement","entity_id":7,"id":7,"rule_ref":"core.on_webhook","status":"created"}`},
		{"event_created", `{"entity_type":"event","entity_id":9000000000,"id":9000000000,"trigger_ref":"core.webhook","payload":{"a":[1,2,{"b":"ü"}]}}`},
		{"workflow_execution_status_changed", `{"entity_type":"workflow_execution","entity_id":-1,"id":1,"status":"failed","old_status":"running","user_id":"7"}`},
		{"execution_status_changed", ` {"entity_type":"execution","entity_id":1,"user_id":-9223372036854775808} `},
		{"c", `{"entity_type":"e\u00e9\"x","entity_id":0,"user_id":1.0}`},
		{"c", `{"entity_type":"a","entity_id":1,"entity_type":"b"}`},
		{"c", `{"ENTITY_TYPE":"a","Entity_ID":1}`},
		{"c", `{"entity_type":"a","entity_id":9223372036854775808}`},
		{"c", `{"entity_type":"a","entity_id":1e2}`},
		{"c", `{"entity_type":"a","entity_id":01}`},
		{"c", `[1]`},
		{"c", ``},
		{"c", "{\"entity_type\":\"a\xff\",\"entity_id\":1}"},
		{"c\xff", `{"entity_type":"a","entity_id":1}`},
	}
	for _, s := range seeds {
		f.Add(s.channel, s.payload)
	}
	f.Fuzz(func(t *testing.T, channel, payload string) {
		n, err := parseNotification(channel, payload, pgFuzzNow)
		if err != nil {
			if n != nil {
				t.Fatalf("error %v with a notification", err)
			}
			return
		}
		raw := bytes.TrimSpace([]byte(payload))
		if !json.Valid(raw) || raw[0] != '{' || !utf8.Valid(raw) {
			t.Fatalf("accepted a payload that is not a UTF-8 JSON object: %q", payload)
		}
		if !json.Valid(n.JSON) || !utf8.Valid(n.JSON) {
			t.Fatalf("notification is not valid UTF-8 JSON: %q", n.JSON)
		}
		if want := encodeFrame(websocket.TextFrame, n.JSON); !bytes.Equal(n.Frame, want) {
			t.Fatalf("frame is not the notification as one text frame")
		}
		var got struct {
			Type             string          `json:"type"`
			NotificationType string          `json:"notification_type"`
			EntityType       json.RawMessage `json:"entity_type"`
			EntityID         json.RawMessage `json:"entity_id"`
			UserID           json.RawMessage `json:"user_id"`
			Payload          json.RawMessage `json:"payload"`
			Timestamp        string          `json:"timestamp"`
		}
		if err := json.Unmarshal(n.JSON, &got); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got.Payload, raw) {
			t.Fatalf("payload changed:\n in  %q\n out %q", raw, got.Payload)
		}
		if got.Type != "notification" || got.Timestamp != "2026-03-04T05:06:07.890123Z" {
			t.Fatalf("type %q, timestamp %q", got.Type, got.Timestamp)
		}
		if utf8.ValidString(channel) && got.NotificationType != channel {
			t.Fatalf("notification_type %q, want %q", got.NotificationType, channel)
		}
		// The envelope agrees with the payload as any JSON client reads it
		// (exact key names; the last of duplicate keys wins).
		var obj map[string]json.RawMessage
		if err := json.Unmarshal(raw, &obj); err != nil {
			t.Fatal(err)
		}
		var et string
		if err := json.Unmarshal(obj["entity_type"], &et); err != nil || et != n.EntityType {
			t.Fatalf("entity_type %q, but the payload's entity_type is %s", n.EntityType, obj["entity_type"])
		}
		var etOut string
		if err := json.Unmarshal(got.EntityType, &etOut); err != nil || etOut != n.EntityType {
			t.Fatalf("envelope entity_type %s, want %q", got.EntityType, n.EntityType)
		}
		if id, ok := parseInteger(obj["entity_id"]); !ok || id != n.EntityID || !bytes.Equal(got.EntityID, obj["entity_id"]) {
			t.Fatalf("entity_id %d (envelope %s), but the payload's entity_id is %s", n.EntityID, got.EntityID, obj["entity_id"])
		}
		if uid, ok := parseInteger(obj["user_id"]); ok != n.HasUser || ok && uid != n.UserID {
			t.Fatalf("user_id %d (%v), but the payload's user_id is %s", n.UserID, n.HasUser, obj["user_id"])
		}
		if !n.HasUser && string(got.UserID) != "null" {
			t.Fatalf("user_id %s, want null", got.UserID)
		}
		// Every filter a client can write for this notification selects it.
		for _, flt := range pgMatchingFilters(n) {
			if back, err := ParseFilter(flt.String()); err == nil && back != flt {
				t.Fatalf("filter %q parses to %+v, want %+v", flt.String(), back, flt)
			}
		}
	})
}

func FuzzParseFilter(f *testing.F) {
	for _, s := range []string{
		"all", "entity_type:execution", "entity:execution:123", "user:42", "notification_type:execution_status_changed",
		"entity_type:workflow_execution", "entity:inquiry:-5", "user:007", "user:-0", "user:9223372036854775807",
		"user:9223372036854775808", "entity:execution:1.5", "entity:execution:1e3", "entity:execution:+1",
		"all:", "all:x", "entity_type:", "entity_type", "entity::1", "entity:a:b:c", "user:", "user: 1",
		"notification_type:a:b", "ALL", "", ":", "entity_type:ü日本", "entity_type:a\x00b", "entity_type:\xff",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		flt, err := ParseFilter(s)
		if err != nil {
			if !strings.Contains(err.Error(), "invalid filter") {
				t.Fatalf("error %q does not say what is wrong", err)
			}
			return
		}
		canon := flt.String()
		back, err := ParseFilter(canon)
		if err != nil || back != flt {
			t.Fatalf("%q -> %q -> %+v, %v: does not round-trip", s, canon, back, err)
		}
		if back.String() != canon {
			t.Fatalf("%q is not canonical", canon)
		}
		parts := strings.Split(s, ":")
		if flt.kind != filterAll && flt.kind != filterUser && flt.typ == "" {
			t.Fatalf("%q: empty type accepted", s)
		}
		// A notification built to match the filter is routed to it.
		n := &Notification{Type: "chan", EntityType: "type", EntityID: 1}
		switch flt.kind {
		case filterAll:
			if s != "all" {
				t.Fatalf("%q accepted as all", s)
			}
		case filterEntityType:
			n.EntityType = flt.typ
		case filterEntity:
			n.EntityType, n.EntityID = flt.typ, flt.id
			if len(parts) != 3 {
				t.Fatalf("%q accepted as an entity filter", s)
			}
		case filterUser:
			n.UserID, n.HasUser = flt.id, true
		case filterNotificationType:
			n.Type = flt.typ
		}
		found := false
		for _, m := range pgMatchingFilters(n) {
			found = found || m == flt
		}
		if !found {
			t.Fatalf("%q: a matching notification is not routed to it", s)
		}
	})
}

func FuzzParseClientMessage(f *testing.F) {
	for _, s := range []string{
		`{"type":"subscribe","filter":"entity_type:execution"}`,
		`{"type":"subscribe","filter":"entity:execution:123","id":"sub-1"}`,
		`{"type":"unsubscribe","filter":"user:42","id":7}`,
		`{"type":"ping"}`,
		`{"type":"ping","id":-1.5e3}`,
		` {"type":"subscribe","filter":"all","id":null} `,
		`{"type":"subscribe"}`,
		`{"type":"subscribe","filter":7}`,
		`{"type":"subscribe","filter":null}`,
		`{"type":"subscribe","filter":"all","id":{}}`,
		`{"type":"subscribe","filter":"all","id":true}`,
		`{"type":5}`,
		`{"type":"Subscribe","filter":"all"}`,
		`{"TYPE":"subscribe","Filter":"all"}`,
		`{"type":"subscribe","type":"ping"}`,
		`{"filter":"all"}`,
		`[]`, `"ping"`, `null`, ``, `{`, `{"type":"ping"}{"type":"ping"}`,
		"{\"type\":\"ping\",\"id\":\"\xff\"}",
		`{"type":"subscribe","filter":"entity_type:\u00e9\ud800"}`,
	} {
		f.Add([]byte(s), true)
	}
	f.Add([]byte(`{"type":"ping"}`), false)
	f.Fuzz(func(t *testing.T, data []byte, text bool) {
		kind := byte(websocket.BinaryFrame)
		if text {
			kind = websocket.TextFrame
		}
		msg, filter, err := parseClientMessage(frameIn{data: data, kind: kind})
		if msg.id != nil {
			var v any
			if err := json.Unmarshal(msg.id, &v); err != nil {
				t.Fatalf("id %q is not JSON", msg.id)
			}
			switch v.(type) {
			case string, float64:
			default:
				t.Fatalf("id %s is neither a string nor a number", msg.id)
			}
		}
		// Every answer the server can send is one JSON object, valid UTF-8 when the input was.
		var answer []byte
		if err != nil {
			if filter != "" {
				t.Fatalf("error %v with filter %q", err, filter)
			}
			answer = pgMarshal(reply{Type: "error", ID: msg.id, Message: err.Error()})
		} else {
			if !text {
				t.Fatal("binary frame accepted")
			}
			switch msg.kind {
			case "ping":
				if filter != "" {
					t.Fatalf("ping with filter %q", filter)
				}
				answer = pgMarshal(reply{Type: "pong", ID: msg.id})
			case "subscribe", "unsubscribe":
				answer = pgMarshal(reply{Type: msg.kind + "d", ID: msg.id, Filter: filter})
				var m map[string]json.RawMessage
				if json.Unmarshal(bytes.TrimSpace(data), &m) != nil {
					t.Fatalf("accepted %q, which is not a JSON object", data)
				}
			default:
				t.Fatalf("accepted kind %q", msg.kind)
			}
		}
		if len(answer) == 0 || !json.Valid(answer) || answer[0] != '{' {
			t.Fatalf("answer %q is not a JSON object", answer)
		}
		if utf8.Valid(data) && !utf8.Valid(answer) {
			t.Fatalf("answer %q is not valid UTF-8", answer)
		}
	})
}

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

// benchPGService runs a Service with the real pq listener on channel.
func benchPGService(b *testing.B, channel string) (*Service, string) {
	p := newPGService(b, pgOptions{channels: []string{channel}})
	p.waitHealth(http.StatusOK)
	return p.svc, p.wsURL()
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
	db := pgOpenDB(b)
	channel := "bench_fanout"
	svc, wsURL := benchPGService(b, channel)
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
	db := pgOpenDB(b)
	channel := "bench_paced"
	_, wsURL := benchPGService(b, channel)
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
	db := pgOpenDB(b)
	channel := "bench_ingest"
	svc, _ := benchPGService(b, channel)
	base := svc.stats.Received.Load()
	cpu0 := cpuTime()
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
	b.ReportMetric(float64((cpuTime()-cpu0).Nanoseconds())/float64(txs*perTx), "service-cpu-ns/notify")
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

// TestClientPingAnsweredLongAfterLastWrite: x/net answers a client's ping
// itself; the pong must get a fresh write deadline, not the stale one of the
// server's last write (Python's websockets pings every 20 s by default).
func TestClientPingAnsweredLongAfterLastWrite(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.Notifier.WriteTimeout = 100 * time.Millisecond })
	c := dial(t, h.wsURL())
	time.Sleep(300 * time.Millisecond) // well past the deadline of the welcome frame's write
	if err := c.writeFrame(websocket.PingFrame, []byte("are you there")); err != nil {
		t.Fatal(err)
	}
	op, p, err := c.readFrame(5 * time.Second)
	if err != nil || op != websocket.PongFrame || string(p) != "are you there" {
		t.Fatalf("got opcode %d %q, %v; want the pong", op, p, err)
	}
	c.subscribe("all") // still open
}

// TestProtocolErrorGetsOneCloseFrame: an unmasked client frame is answered by
// x/net with close 1002; nothing, not even our own close, may follow it.
func TestProtocolErrorGetsOneCloseFrame(t *testing.T) {
	h := newHarness(t, nil)
	c := dial(t, h.wsURL())
	msg := `{"type":"ping"}`
	if _, err := c.conn.Write(append([]byte{0x81, byte(len(msg))}, msg...)); err != nil { // unmasked
		t.Fatal(err)
	}
	var closes []int
	for {
		op, p, err := c.readFrame(5 * time.Second)
		if err != nil {
			break
		}
		if op == websocket.CloseFrame {
			closes = append(closes, int(binary.BigEndian.Uint16(p)))
		}
	}
	if len(closes) != 1 || closes[0] != 1002 {
		t.Fatalf("close frames %v, want exactly one 1002", closes)
	}
}

// TestOriginsAreComparedAsBrowsersSendThem: a configured origin with a
// trailing slash or capitals still admits the browser's Origin header.
func TestOriginsAreComparedAsBrowsersSendThem(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.Notifier.AllowedOrigins = []string{"https://App.Example.com/"} })
	_, resp := dialRaw(t, h.wsURL(), http.Header{"Origin": {"https://app.example.com"}})
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("allowed origin: status %d, want 101", resp.StatusCode)
	}
	_, resp = dialRaw(t, h.wsURL(), http.Header{"Origin": {"https://evil.example.com"}})
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("other origin: status %d, want 403", resp.StatusCode)
	}
}

// TestListenRefusedIsRetriedAndShown: a LISTEN the server refuses is retried,
// and /health says why it is not ready meanwhile.
func TestListenRefusedIsRetriedAndShown(t *testing.T) {
	cfg := testConfig()
	cfg.Database.ReconnectMaxInterval = 300 * time.Millisecond
	svc := newService(cfg, slog.New(slog.DiscardHandler))
	l := newFakeListener()
	l.listenErrs = 2
	svc.onListenerEvent(pq.ListenerEventConnected, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); svc.runListener(ctx, l) }()
	t.Cleanup(func() { cancel(); l.Close(); <-done })
	s := serve(t, svc)
	waitFor(t, "the LISTEN error in /health", func() bool {
		code, m := getJSON(t, s.srv.URL+"/health")
		reason, _ := m["reason"].(string)
		return code == http.StatusServiceUnavailable && strings.Contains(reason, "LISTEN") && strings.Contains(reason, "recovery")
	})
	waitFor(t, "/health 200 after the retries", func() bool {
		code, _ := getJSON(t, s.srv.URL+"/health")
		return code == http.StatusOK
	})
	l.mu.Lock()
	defer l.mu.Unlock()
	if got := len(l.channels); got != len(cfg.Notifier.Channels) {
		t.Fatalf("LISTENed %d channels, want %d", got, len(cfg.Notifier.Channels))
	}
}
