package main

import (
	"bufio"
	"bytes"
	"context"
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
	"path/filepath"
	"slices"
	"strconv"
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

// stats returns /stats decoded.
func (h *harness) stats() map[string]any {
	h.t.Helper()
	code, m := getJSON(h.t, h.srv.URL+"/stats")
	if code != http.StatusOK {
		h.t.Fatalf("/stats: status %d", code)
	}
	return m
}

// stat returns one numeric /stats field.
func (h *harness) stat(key string) float64 {
	h.t.Helper()
	v, ok := h.stats()[key].(float64)
	if !ok {
		h.t.Fatalf("/stats has no numeric %q", key)
	}
	return v
}

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
