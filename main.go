// Attune-notifier turns PostgreSQL NOTIFY events into live WebSocket notifications.
//
// It LISTENs on a set of PostgreSQL channels, turns each JSON payload into a
// notification, and pushes it to every WebSocket client whose subscription
// filters match. It is the real-time half of the Attune automation platform, and
// it works for any PostgreSQL database whose triggers call pg_notify with a JSON
// object carrying "entity_type" (a string) and "entity_id" (an integer).
//
// Usage:
//
//	attune-notifier [--config FILE] [--log-level LEVEL]
//	attune-notifier --healthcheck [--config FILE]
//	attune-notifier --version
//
// Configuration comes from a YAML file (--config FILE, else $ATTUNE_CONFIG, else
// ./config.notifier.yaml when it exists, else built-in defaults), then from
// ATTUNE__SECTION__KEY environment variables, which override the file
// (ATTUNE__NOTIFIER__PORT=9000; lists are comma-separated). Unknown keys and bad
// values stop the program with exit code 2 and one line naming the key.
// config.example.yaml documents every key.
//
// Endpoints:
//
//	GET /ws      WebSocket; see the protocol below
//	GET /health  200 {"status":"ok"} while the database listener is connected, else 503
//	GET /stats   200 with counters (clients, subscriptions, notifications, listener state)
//
// Protocol on /ws. The server sends {"type":"welcome","client_id":"client_N",...}
// first. A client sends {"type":"subscribe","filter":F}, {"type":"unsubscribe",
// "filter":F} or {"type":"ping"}; a message that carries an "id" (string or
// number) is answered with {"type":"subscribed"|"unsubscribed"|"pong","id":...}
// once it has taken effect. Filters: all, entity_type:TYPE, entity:TYPE:ID,
// user:ID, notification_type:CHANNEL. Notifications arrive as
// {"type":"notification","notification_type":CHANNEL,"entity_type":...,
// "entity_id":...,"user_id":...,"payload":{...},"timestamp":...}. Bad messages
// are answered with {"type":"error","message":...} and the connection stays
// open. After the database connection is lost and re-established every client
// receives {"type":"resync",...}: notifications sent meanwhile are lost, so
// refetch. Slow consumers are closed with 1013, idle peers are pinged and
// closed when silent for two ping intervals.
//
// SIGINT or SIGTERM closes every client with 1001 and exits 0.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"regexp"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/lib/pq"
	"go.yaml.in/yaml/v3"
	"golang.org/x/net/websocket"
)

// Tunables that are not worth a configuration key.
const (
	closeGrace         = 2 * time.Second  // for writing a close frame and waiting for the peer's reply
	healthcheckTimeout = 3 * time.Second  // --healthcheck gives up after this
	wsReadBuffer       = 512              // x/net/websocket's read buffer per connection (client messages are small)
	wsWriteBuffer      = 256              // its write buffer: handshake response, pongs, protocol-error closes
	listenerPingEvery  = 15 * time.Second // how often the database listener is pinged (see watchListener)
	logPayloadBytes    = 200              // how much of a bad NOTIFY payload is logged
	maxCloseReason     = 123              // RFC 6455: a close frame's reason fits in 125 bytes with the code
	welcomeText        = "Connected to Attune Notifier"
)

// version is set at build time with -ldflags "-X main.version=v1.2.3"; when empty
// the module version recorded by `go install` is used.
var version = ""

// ---------------------------------------------------------------------------
// Configuration

// Config is the whole configuration, in the layout of the Attune config files.
type Config struct {
	ServiceName string
	Environment string
	Database    DatabaseConfig
	Notifier    NotifierConfig
	Log         LogConfig
}

type DatabaseConfig struct {
	URL                  string
	MaxConnections       int // accepted for compatibility with Attune's shared config; the notifier holds one connection
	ReconnectMinInterval time.Duration
	ReconnectMaxInterval time.Duration
	PingTimeout          time.Duration // a listener that does not answer a ping within this is reconnected
}

type NotifierConfig struct {
	Host             string
	Port             int
	MaxConnections   int
	Channels         []string
	MaxSubscriptions int
	MaxMessageBytes  int
	ClientQueue      int
	PingInterval     time.Duration
	WriteTimeout     time.Duration
	AllowedOrigins   []string
	ShutdownTimeout  time.Duration
}

type LogConfig struct {
	Level   string
	Format  string
	Console bool
}

func defaultConfig() Config {
	return Config{
		ServiceName: "attune-notifier",
		Environment: "development",
		Database: DatabaseConfig{
			URL:                  "postgresql://postgres:postgres@localhost:5432/attune?sslmode=disable",
			MaxConnections:       10,
			ReconnectMinInterval: 1 * time.Second,
			ReconnectMaxInterval: 30 * time.Second,
			PingTimeout:          5 * time.Second,
		},
		Notifier: NotifierConfig{
			Host:           "0.0.0.0",
			Port:           8081,
			MaxConnections: 10000,
			Channels: []string{
				"execution_status_changed", "execution_created", "inquiry_created", "inquiry_responded",
				"enforcement_created", "event_created", "workflow_execution_status_changed",
			},
			MaxSubscriptions: 100,
			MaxMessageBytes:  4096,
			ClientQueue:      1024, // absorbs a 500-notification burst to 1,000 clients on 2 cores (BenchmarkPGFanout); pooled, so free when idle
			PingInterval:     30 * time.Second,
			WriteTimeout:     10 * time.Second,
			AllowedOrigins:   []string{"*"},
			ShutdownTimeout:  10 * time.Second,
		},
		Log: LogConfig{Level: "info", Format: "json", Console: true},
	}
}

// keys lists every configuration key with the field it sets. The YAML loader,
// the environment overrides and config.example.yaml all follow this table.
func (c *Config) keys() map[string]any {
	return map[string]any{
		"service_name":                    &c.ServiceName,
		"environment":                     &c.Environment,
		"database.url":                    &c.Database.URL,
		"database.max_connections":        &c.Database.MaxConnections,
		"database.reconnect_min_interval": &c.Database.ReconnectMinInterval,
		"database.reconnect_max_interval": &c.Database.ReconnectMaxInterval,
		"database.ping_timeout":           &c.Database.PingTimeout,
		"notifier.host":                   &c.Notifier.Host,
		"notifier.port":                   &c.Notifier.Port,
		"notifier.max_connections":        &c.Notifier.MaxConnections,
		"notifier.channels":               &c.Notifier.Channels,
		"notifier.max_subscriptions":      &c.Notifier.MaxSubscriptions,
		"notifier.max_message_bytes":      &c.Notifier.MaxMessageBytes,
		"notifier.client_queue":           &c.Notifier.ClientQueue,
		"notifier.ping_interval":          &c.Notifier.PingInterval,
		"notifier.write_timeout":          &c.Notifier.WriteTimeout,
		"notifier.allowed_origins":        &c.Notifier.AllowedOrigins,
		"notifier.shutdown_timeout":       &c.Notifier.ShutdownTimeout,
		"log.level":                       &c.Log.Level,
		"log.format":                      &c.Log.Format,
		"log.console":                     &c.Log.Console,
	}
}

// configLoader fills a Config and remembers where each key was set, so that
// every error names the file (and line) or the environment variable.
type configLoader struct {
	cfg    Config
	keys   map[string]any
	origin map[string]string // key -> "config.yaml:12" or "ATTUNE__NOTIFIER__PORT"
}

// loadConfig reads path (if not empty), then the ATTUNE__ variables in env,
// then validates. Unknown ATTUNE__ variables are returned as warnings: a
// sidecar often shares the environment of the whole Attune deployment.
func loadConfig(path string, env []string) (cfg Config, warnings []string, err error) {
	l := &configLoader{cfg: defaultConfig(), origin: map[string]string{}}
	l.keys = l.cfg.keys()
	if path != "" {
		if err := l.loadFile(path); err != nil {
			return Config{}, nil, err
		}
	}
	for _, kv := range env {
		name, value, _ := strings.Cut(kv, "=")
		if !strings.HasPrefix(name, "ATTUNE__") {
			continue
		}
		key := strings.ToLower(strings.ReplaceAll(strings.TrimPrefix(name, "ATTUNE__"), "__", "."))
		ptr, ok := l.keys[key]
		if !ok {
			warnings = append(warnings, fmt.Sprintf("ignoring %s: no configuration key %q", name, key))
			continue
		}
		l.origin[key] = name
		if err := setValue(ptr, value, nil); err != nil {
			return Config{}, nil, fmt.Errorf("%s: %s: %v", name, key, err)
		}
	}
	return l.cfg, warnings, l.validate()
}

func (l *configLoader) loadFile(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return fmt.Errorf("%s: %v", path, err)
	}
	if len(doc.Content) == 0 { // an empty file: all defaults
		return nil
	}
	return l.walk(path, "", doc.Content[0])
}

// walk sets every key of a YAML mapping, recursing into sections.
func (l *configLoader) walk(path, prefix string, n *yaml.Node) error {
	if n.Tag == "!!null" { // "notifier:" with nothing under it
		return nil
	}
	if n.Kind != yaml.MappingNode {
		name := strings.TrimSuffix(prefix, ".")
		if name == "" {
			name = "top level"
		}
		return fmt.Errorf("%s:%d: %s: want a mapping of keys", path, n.Line, name)
	}
	seen := map[string]int{} // key -> line
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		key := prefix + k.Value
		if first, dup := seen[key]; dup {
			return fmt.Errorf("%s:%d: %s: set twice (first at line %d)", path, k.Line, key, first)
		}
		seen[key] = k.Line
		ptr, ok := l.keys[key]
		if !ok {
			if prefix == "" && isSection(key) {
				if err := l.walk(path, key+".", v); err != nil {
					return err
				}
				continue
			}
			return fmt.Errorf("%s:%d: %s: unknown key", path, k.Line, key)
		}
		l.origin[key] = fmt.Sprintf("%s:%d", path, v.Line)
		if err := setValue(ptr, v.Value, v); err != nil {
			return fmt.Errorf("%s:%d: %s: %v", path, v.Line, key, err)
		}
	}
	return nil
}

func isSection(name string) bool { return name == "database" || name == "notifier" || name == "log" }

// setValue parses s (or, for lists, the YAML sequence n) into the field ptr.
func setValue(ptr any, s string, n *yaml.Node) error {
	if n != nil && n.Kind != yaml.ScalarNode {
		list, ok := ptr.(*[]string)
		if !ok || n.Kind != yaml.SequenceNode {
			return errors.New("want a single value")
		}
		*list = (*list)[:0:0]
		for _, item := range n.Content {
			if item.Kind != yaml.ScalarNode {
				return errors.New("want a list of strings")
			}
			*list = append(*list, item.Value)
		}
		return nil
	}
	if n != nil && n.Tag == "!!null" {
		return errors.New("missing value")
	}
	switch p := ptr.(type) {
	case *string:
		*p = s
	case *int:
		v, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil {
			return fmt.Errorf("want an integer, got %q", s)
		}
		*p = v
	case *bool:
		v, err := strconv.ParseBool(strings.TrimSpace(s))
		if err != nil {
			return fmt.Errorf("want true or false, got %q", s)
		}
		*p = v
	case *time.Duration:
		v, err := time.ParseDuration(strings.TrimSpace(s))
		if err != nil {
			return fmt.Errorf("want a duration such as 30s or 500ms, got %q", s)
		}
		*p = v
	case *[]string:
		*p = nil
		for _, item := range strings.Split(s, ",") {
			if item = strings.TrimSpace(item); item != "" {
				*p = append(*p, item)
			}
		}
	}
	return nil
}

func (l *configLoader) validate() error {
	c := &l.cfg
	bad := func(key, format string, args ...any) error {
		where := l.origin[key]
		if where == "" {
			where = "default"
		}
		return fmt.Errorf("%s: %s: %s", where, key, fmt.Sprintf(format, args...))
	}
	if _, err := pq.NewConnector(c.Database.URL); err != nil {
		return bad("database.url", "not a valid PostgreSQL URL or connection string: %s",
			redactDSN(err.Error(), c.Database.URL))
	}
	positive := []struct {
		key string
		v   int
	}{
		{"database.max_connections", c.Database.MaxConnections},
		{"notifier.max_connections", c.Notifier.MaxConnections},
		{"notifier.max_subscriptions", c.Notifier.MaxSubscriptions},
		{"notifier.client_queue", c.Notifier.ClientQueue},
	}
	for _, p := range positive {
		if p.v < 1 {
			return bad(p.key, "must be at least 1 (got %d)", p.v)
		}
	}
	if c.Notifier.Port < 1 || c.Notifier.Port > 65535 {
		return bad("notifier.port", "must be between 1 and 65535 (got %d)", c.Notifier.Port)
	}
	if c.Notifier.MaxMessageBytes < 64 {
		return bad("notifier.max_message_bytes", "must be at least 64 (got %d)", c.Notifier.MaxMessageBytes)
	}
	durations := []struct {
		key string
		v   time.Duration
	}{
		{"database.reconnect_min_interval", c.Database.ReconnectMinInterval},
		{"database.reconnect_max_interval", c.Database.ReconnectMaxInterval},
		{"database.ping_timeout", c.Database.PingTimeout},
		{"notifier.ping_interval", c.Notifier.PingInterval},
		{"notifier.write_timeout", c.Notifier.WriteTimeout},
		{"notifier.shutdown_timeout", c.Notifier.ShutdownTimeout},
	}
	for _, d := range durations {
		if d.v <= 0 {
			return bad(d.key, "must be a positive duration (got %s)", d.v)
		}
	}
	if c.Database.ReconnectMaxInterval < c.Database.ReconnectMinInterval {
		return bad("database.reconnect_max_interval", "must not be less than database.reconnect_min_interval (%s)",
			c.Database.ReconnectMinInterval)
	}
	if len(c.Notifier.Channels) == 0 {
		return bad("notifier.channels", "must name at least one channel")
	}
	for i, ch := range c.Notifier.Channels {
		if ch == "" || len(ch) > 63 {
			return bad("notifier.channels", "channel %q must be 1 to 63 bytes long", ch)
		}
		if slices.Contains(c.Notifier.Channels[:i], ch) {
			return bad("notifier.channels", "channel %q is listed twice", ch)
		}
	}
	if len(c.Notifier.AllowedOrigins) == 0 {
		return bad("notifier.allowed_origins", `must list at least one origin, or "*" for any`)
	}
	for _, o := range c.Notifier.AllowedOrigins {
		if _, err := normalizeOrigin(o); err != nil {
			return bad("notifier.allowed_origins", "%v", err)
		}
	}
	if _, err := parseLevel(c.Log.Level); err != nil {
		return bad("log.level", "%v", err)
	}
	if c.Log.Format != "json" && c.Log.Format != "text" {
		return bad("log.format", "must be json or text (got %q)", c.Log.Format)
	}
	return nil
}

// normalizeOrigin returns an allowed origin as browsers send it in Origin,
// lower-cased: scheme://host[:port], or "*".
func normalizeOrigin(o string) (string, error) {
	if o == "*" {
		return o, nil
	}
	u, err := url.Parse(o)
	if err != nil || u.Scheme == "" || u.Host == "" || u.User != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
		return "", fmt.Errorf("%q is not an origin: want scheme://host[:port], such as https://app.example.com", o)
	}
	return strings.ToLower(u.Scheme + "://" + u.Host), nil
}

func parseLevel(s string) (slog.Level, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("must be debug, info, warn or error (got %q)", s)
	}
	return level, nil
}

func newLogger(c LogConfig, w io.Writer) *slog.Logger {
	if !c.Console {
		return slog.New(slog.DiscardHandler)
	}
	level, _ := parseLevel(c.Level)
	opts := &slog.HandlerOptions{Level: level}
	if c.Format == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

var dsnPassword = regexp.MustCompile(`(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)`)

// urlPassword is the password of a URL's userinfo as written (percent-encoded,
// or in a URL too broken for url.Parse).
var urlPassword = regexp.MustCompile(`(://[^:/?#@\s"]*:)[^?#\s"]*@`)

// redactDSN hides the password of dsn inside s (s may be dsn itself, or an
// error message that quotes it).
func redactDSN(s, dsn string) string {
	if s == dsn { // for the log: precise, so that a user or host equal to the password stays readable
		if u, err := url.Parse(dsn); err == nil && u.Scheme != "" {
			return u.Redacted()
		}
		return dsnPassword.ReplaceAllString(urlPassword.ReplaceAllString(s, "${1}xxxxx@"), "${1}xxxxx")
	}
	password := ""
	if u, err := url.Parse(dsn); err == nil && u.User != nil {
		password, _ = u.User.Password()
	} else if m := dsnPassword.FindStringSubmatch(dsn); m != nil {
		password = strings.Trim(m[2], "'")
	}
	if password != "" {
		s = strings.ReplaceAll(s, password, "xxxxx")
	}
	s = urlPassword.ReplaceAllString(s, "${1}xxxxx@")
	return dsnPassword.ReplaceAllString(s, "${1}xxxxx")
}

// listenerDSN adds what a long-lived listener needs and users rarely write:
// a connect timeout (without one a connect can hang forever) and an
// application_name that makes the listener easy to find in pg_stat_activity.
func listenerDSN(dsn string) string {
	add := map[string]string{"connect_timeout": "10", "application_name": "attune-notifier"}
	if u, err := url.Parse(dsn); err == nil && (u.Scheme == "postgres" || u.Scheme == "postgresql") {
		q := u.Query()
		for k, v := range add {
			if !q.Has(k) {
				q.Set(k, v)
			}
		}
		u.RawQuery = q.Encode()
		return u.String()
	}
	for _, k := range []string{"connect_timeout", "application_name"} {
		if !regexp.MustCompile(`(^|\s)` + k + `\s*=`).MatchString(dsn) {
			dsn += " " + k + "=" + add[k]
		}
	}
	return dsn
}

// ---------------------------------------------------------------------------
// Listener: PostgreSQL LISTEN, turned into notifications

// Listener is what the service needs from a PostgreSQL listener. pgListener
// adapts *pq.Listener; tests use a fake.
type Listener interface {
	Listen(channel string) error
	// NotificationChannel delivers NOTIFYs; a nil value means the connection was
	// re-established and notifications may have been lost; it is closed by Close.
	NotificationChannel() <-chan *pq.Notification
	Ping() error
	// Reset drops the current connection so that the listener reconnects.
	Reset()
	Close() error
}

// pgListener is a pq.Listener whose dialer remembers the current socket, so a
// connection that stopped answering can be cut (pq then reconnects by itself).
type pgListener struct {
	*pq.Listener
	dialer *netDialer
}

func newPGListener(c DatabaseConfig, onEvent pq.EventCallbackType) *pgListener {
	d := &netDialer{}
	l := pq.NewDialListener(d, listenerDSN(c.URL), c.ReconnectMinInterval, c.ReconnectMaxInterval, onEvent)
	return &pgListener{Listener: l, dialer: d}
}

func (l *pgListener) Reset() { l.dialer.closeActive() }

// netDialer implements pq.Dialer and pq.DialerContext.
type netDialer struct {
	net.Dialer
	mu     sync.Mutex
	active net.Conn // the last connection dialed; guarded by mu
}

func (d *netDialer) Dial(network, address string) (net.Conn, error) {
	return d.DialContext(context.Background(), network, address)
}

func (d *netDialer) DialTimeout(network, address string, timeout time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return d.DialContext(ctx, network, address)
}

func (d *netDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	c, err := d.Dialer.DialContext(ctx, network, address)
	if err == nil {
		d.mu.Lock()
		d.active = c
		d.mu.Unlock()
	}
	return c, err
}

func (d *netDialer) closeActive() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.active != nil {
		d.active.Close()
	}
}

// Notification is one validated NOTIFY, with the frame every recipient gets.
type Notification struct {
	Type       string // the channel, "notification_type" on the wire
	EntityType string
	EntityID   int64
	UserID     int64
	HasUser    bool   // false: "user_id" is null
	JSON       []byte // the notification as JSON text
	Frame      []byte // JSON as a complete WebSocket frame, encoded once for all recipients
}

// parseNotification validates a NOTIFY payload: a JSON object with a string
// "entity_type" and an integer "entity_id"; "user_id" is used when it is an
// integer. The payload is embedded unchanged. This is the ingest hot path:
// json.Valid checks the whole payload without allocating, then topLevelFields
// picks the three fields out of it.
func parseNotification(channel, payload string, now time.Time) (*Notification, error) {
	raw := bytes.TrimSpace([]byte(payload))
	if len(raw) == 0 || raw[0] != '{' {
		return nil, errors.New("payload is not a JSON object")
	}
	if !json.Valid(raw) {
		return nil, errors.New("payload is not valid JSON")
	}
	if !utf8.Valid(raw) {
		return nil, errors.New("payload is not valid UTF-8")
	}
	entityType, entityID, userID := topLevelFields(raw)
	n := &Notification{Type: channel}
	if len(entityType) == 0 || entityType[0] != '"' {
		return nil, errors.New(`payload has no string "entity_type"`)
	}
	if bytes.IndexByte(entityType, '\\') < 0 {
		n.EntityType = string(entityType[1 : len(entityType)-1])
	} else if err := json.Unmarshal(entityType, &n.EntityType); err != nil {
		return nil, fmt.Errorf(`payload "entity_type": %v`, err)
	}
	id, ok := parseInteger(entityID)
	if !ok {
		return nil, errors.New(`payload has no integer "entity_id"`)
	}
	n.EntityID = id
	if uid, ok := parseInteger(userID); ok {
		n.UserID, n.HasUser = uid, true
	} else {
		userID = []byte("null")
	}

	b := make([]byte, frameHeadroom, frameHeadroom+len(raw)+len(channel)+len(entityType)+len(entityID)+len(userID)+160)
	b = append(b, `{"type":"notification","notification_type":`...)
	b = appendJSONString(b, channel)
	b = append(b, `,"entity_type":`...)
	b = append(b, entityType...)
	b = append(b, `,"entity_id":`...)
	b = append(b, entityID...)
	b = append(b, `,"user_id":`...)
	b = append(b, userID...)
	b = append(b, `,"payload":`...)
	b = append(b, raw...)
	b = append(b, `,"timestamp":"`...)
	b = appendTimestamp(b, now)
	b = append(b, `"}`...)
	n.JSON = b[frameHeadroom:]
	n.Frame = putFrameHeader(b, websocket.TextFrame)
	return n, nil
}

// topLevelFields returns the raw values of "entity_type", "entity_id" and
// "user_id" in obj, which must be a valid JSON object (the last of duplicate
// keys wins, as in encoding/json; keys are matched exactly).
func topLevelFields(obj []byte) (entityType, entityID, userID []byte) {
	i := 1 // past '{'
	for {
		i = skipSpace(obj, i)
		if obj[i] == '}' {
			return
		}
		keyEnd := valueEnd(obj, i)
		key := obj[i+1 : keyEnd-1]
		start := skipSpace(obj, skipSpace(obj, keyEnd)+1) // past ':'
		end := valueEnd(obj, start)
		switch string(key) {
		case "entity_type":
			entityType = obj[start:end]
		case "entity_id":
			entityID = obj[start:end]
		case "user_id":
			userID = obj[start:end]
		}
		if i = skipSpace(obj, end); obj[i] == ',' {
			i++
		}
	}
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// valueEnd returns the index just past the JSON value starting at b[i]; b is valid JSON.
func valueEnd(b []byte, i int) int {
	switch b[i] {
	case '"':
		for i++; b[i] != '"'; i++ {
			if b[i] == '\\' {
				i++
			}
		}
		return i + 1
	case '{', '[':
		depth := 0
		for {
			switch b[i] {
			case '"':
				i = valueEnd(b, i)
				continue
			case '{', '[':
				depth++
			case '}', ']':
				if depth--; depth == 0 {
					return i + 1
				}
			}
			i++
		}
	default: // number, true, false, null
		for i < len(b) {
			switch b[i] {
			case ',', '}', ']', ' ', '\t', '\r', '\n':
				return i
			}
			i++
		}
		return i
	}
}

// appendTimestamp appends t as RFC 3339 UTC with microseconds, like
// 2024-01-15T10:30:00.123456Z (time.AppendFormat costs 15% of parsing).
func appendTimestamp(b []byte, t time.Time) []byte {
	t = t.UTC()
	year, month, day := t.Date()
	hour, minute, second := t.Clock()
	for _, f := range [...]struct {
		v, width int
		sep      byte
	}{{year, 4, '-'}, {int(month), 2, '-'}, {day, 2, 'T'}, {hour, 2, ':'}, {minute, 2, ':'}, {second, 2, '.'}, {t.Nanosecond() / 1000, 6, 'Z'}} {
		for d := f.width - 1; d >= 0; d-- {
			b = append(b, byte('0'+f.v/pow10[d]%10))
		}
		b = append(b, f.sep)
	}
	return b
}

var pow10 = [...]int{1, 10, 100, 1000, 10000, 100000}

// appendJSONString appends s as a JSON string; channel names rarely need escaping.
func appendJSONString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c == '"' || c == '\\' || c >= 0x80 {
			q, _ := json.Marshal(s)
			return append(b, q...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}

// parseInteger accepts a JSON number without fraction or exponent that fits in int64.
func parseInteger(raw []byte) (int64, bool) {
	if len(raw) == 0 || !(raw[0] == '-' || raw[0] >= '0' && raw[0] <= '9') {
		return 0, false
	}
	v, err := strconv.ParseInt(string(raw), 10, 64)
	return v, err == nil
}

// ---------------------------------------------------------------------------
// Filters, hub and clients

type filterKind uint8

const (
	filterAll filterKind = iota
	filterEntityType
	filterEntity
	filterUser
	filterNotificationType
)

// Filter is one parsed subscription. It is comparable, so it keys the hub's index.
type Filter struct {
	kind filterKind
	typ  string // entity type or notification type
	id   int64  // entity id or user id
}

// ParseFilter accepts exactly: all, entity_type:TYPE, entity:TYPE:ID, user:ID,
// notification_type:TYPE, with TYPE non-empty and ID an integer.
func ParseFilter(s string) (Filter, error) {
	parts := strings.Split(s, ":")
	want := map[string]int{"all": 1, "entity_type": 2, "entity": 3, "user": 2, "notification_type": 2}[parts[0]]
	if want == 0 {
		return Filter{}, fmt.Errorf("invalid filter %q: expected all, entity_type:TYPE, entity:TYPE:ID, user:ID or notification_type:TYPE", s)
	}
	if len(parts) != want {
		return Filter{}, fmt.Errorf("invalid filter %q: %s takes %d part(s) separated by ':'", s, parts[0], want)
	}
	for _, p := range parts[1:] {
		if p == "" {
			return Filter{}, fmt.Errorf("invalid filter %q: empty part", s)
		}
	}
	id := func(p string) (int64, error) {
		v, ok := parseInteger([]byte(p))
		if !ok {
			return 0, fmt.Errorf("invalid filter %q: %q is not an integer", s, p)
		}
		return v, nil
	}
	switch parts[0] {
	case "all":
		return Filter{kind: filterAll}, nil
	case "entity_type":
		return Filter{kind: filterEntityType, typ: parts[1]}, nil
	case "notification_type":
		return Filter{kind: filterNotificationType, typ: parts[1]}, nil
	case "user":
		v, err := id(parts[1])
		return Filter{kind: filterUser, id: v}, err
	default: // entity
		v, err := id(parts[2])
		return Filter{kind: filterEntity, typ: parts[1], id: v}, err
	}
}

func (f Filter) String() string {
	switch f.kind {
	case filterAll:
		return "all"
	case filterEntityType:
		return "entity_type:" + f.typ
	case filterEntity:
		return "entity:" + f.typ + ":" + strconv.FormatInt(f.id, 10)
	case filterUser:
		return "user:" + strconv.FormatInt(f.id, 10)
	default:
		return "notification_type:" + f.typ
	}
}

// matchingFilters lists every filter that selects n: routing is a handful of
// index look-ups, whatever the number of clients.
func (n *Notification) matchingFilters() (fs [5]Filter, count int) {
	fs[0] = Filter{kind: filterAll}
	fs[1] = Filter{kind: filterEntityType, typ: n.EntityType}
	fs[2] = Filter{kind: filterEntity, typ: n.EntityType, id: n.EntityID}
	fs[3] = Filter{kind: filterNotificationType, typ: n.Type}
	count = 4
	if n.HasUser {
		fs[4] = Filter{kind: filterUser, id: n.UserID}
		count = 5
	}
	return fs, count
}

// Stats are the service's counters, served by /stats.
type Stats struct {
	Received      atomic.Uint64 // NOTIFYs read from PostgreSQL
	Delivered     atomic.Uint64 // notification frames queued to clients
	Dropped       atomic.Uint64 // NOTIFYs whose payload was rejected
	SlowConsumers atomic.Uint64 // clients closed because their queue was full
	ClientErrors  atomic.Uint64 // error frames sent for bad client messages
	Resyncs       atomic.Uint64 // times every client was told to resync
}

// Hub routes notifications to clients. Its mutex guards the client set, the
// filter index and each Client's filters and seen fields. Dispatch holds it for
// one notification at a time, so every client sees notifications in the order
// the listener received them; sends never block (see Client.send).
type Hub struct {
	maxSubs int
	stats   *Stats

	mu      sync.Mutex
	clients map[*Client]struct{}
	index   map[Filter]map[*Client]struct{}
	subs    int    // total subscriptions over all clients
	seq     uint64 // dispatch counter: a client whose seen == seq already has the current notification
	closed  bool   // shutting down: no new clients

	live  sync.WaitGroup // one per registered client, done when its handler returns
	slots atomic.Int64   // WebSocket connections, handshakes included, against notifier.max_connections
}

func newHub(maxSubs int, stats *Stats) *Hub {
	return &Hub{
		maxSubs: maxSubs,
		stats:   stats,
		clients: map[*Client]struct{}{},
		index:   map[Filter]map[*Client]struct{}{},
	}
}

var errTooManySubscriptions = errors.New("too many subscriptions")

// register adds c and queues its welcome frame; false when shutting down.
func (h *Hub) register(c *Client) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return false
	}
	h.clients[c] = struct{}{}
	h.live.Add(1)
	c.send(encodeFrame(websocket.TextFrame, fmt.Appendf(nil, `{"type":"welcome","client_id":%q,"message":%q}`, c.id, welcomeText)))
	return true
}

func (h *Hub) unregister(c *Client) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, f := range c.filters {
		h.removeFromIndex(f, c)
	}
	h.subs -= len(c.filters)
	c.filters = nil
	delete(h.clients, c)
	h.live.Done()
}

// subscribe adds f to c's filters, then queues reply (if any), under one lock:
// every notification c receives after the reply has been routed with f.
func (h *Hub) subscribe(c *Client, f Filter, reply []byte) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !slices.Contains(c.filters, f) {
		if len(c.filters) >= h.maxSubs {
			return errTooManySubscriptions
		}
		c.filters = append(c.filters, f)
		set := h.index[f]
		if set == nil {
			set = map[*Client]struct{}{}
			h.index[f] = set
		}
		set[c] = struct{}{}
		h.subs++
	}
	if reply != nil {
		c.send(reply)
	}
	return nil
}

func (h *Hub) unsubscribe(c *Client, f Filter, reply []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if i := slices.Index(c.filters, f); i >= 0 {
		c.filters = slices.Delete(c.filters, i, i+1)
		h.removeFromIndex(f, c)
		h.subs--
	}
	if reply != nil {
		c.send(reply)
	}
}

func (h *Hub) removeFromIndex(f Filter, c *Client) {
	set := h.index[f]
	delete(set, c)
	if len(set) == 0 {
		delete(h.index, f)
	}
}

// dispatch queues n to every client with a matching filter, at most once each.
func (h *Hub) dispatch(n *Notification) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.seq++
	queued := 0
	filters, count := n.matchingFilters()
	for _, f := range filters[:count] {
		for c := range h.index[f] {
			if c.seen == h.seq {
				continue
			}
			c.seen = h.seq
			if c.send(n.Frame) {
				queued++
			}
		}
	}
	h.stats.Delivered.Add(uint64(queued))
}

// broadcast queues frame to every client, whatever its filters.
func (h *Hub) broadcast(frame []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for c := range h.clients {
		c.send(frame)
	}
}

// counts reports connected clients and their subscriptions.
func (h *Hub) counts() (clients, subs int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.clients), h.subs
}

// reserve takes one of max connection slots; release gives it back.
func (h *Hub) reserve(max int) bool {
	for {
		n := h.slots.Load()
		if n >= int64(max) {
			return false
		}
		if h.slots.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

func (h *Hub) release() { h.slots.Add(-1) }

// closeAll stops registrations and asks every client to close with code.
func (h *Hub) closeAll(code int, reason string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	for c := range h.clients {
		c.closeWith(code, reason)
	}
}

// forceClose cuts the sockets of clients that did not finish closing in time.
func (h *Hub) forceClose() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for c := range h.clients {
		c.conn.Close()
	}
}

// wait waits until every client handler has returned, or ctx ends.
func (h *Hub) wait(ctx context.Context) error {
	done := make(chan struct{})
	go func() { h.live.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Client is one WebSocket connection. Its handler goroutine is the only reader
// of ws. Frames go out through the queue: the writer goroutine (flush), which
// runs only while the queue is non-empty, is the only one that writes them.
type Client struct {
	id    string
	ws    *websocket.Conn
	conn  *trackedConn // the socket under ws: read activity, raw writes, forced close
	stats *Stats

	filters []Filter // guarded by Hub.mu
	seen    uint64   // guarded by Hub.mu; see Hub.seq

	limit        int           // queue capacity
	pingInterval time.Duration // also the keep-alive unit: silent for two intervals means dead
	writeTimeout time.Duration
	pinger       *time.Timer
	lastReads    uint64 // conn.reads at the last ping; only the pinger's callback uses it
	silent       int    // pings in a row with nothing read; only the pinger's callback uses it

	mu          sync.Mutex
	queue       *batch // complete frames waiting for the writer, at most limit; nil when empty; guarded by mu
	writing     bool   // a writer goroutine is running; guarded by mu
	closeCode   int    // guarded by mu; 0 means close without a close frame
	closeReason string // guarded by mu
	closing     atomic.Bool
	done        chan struct{} // closed when the writer has sent the close frame and half-closed
}

var clientSeq atomic.Uint64 // process-wide, for client_N ids

func newClient(ws *websocket.Conn, conn *trackedConn, stats *Stats, cfg NotifierConfig) *Client {
	c := &Client{
		id:           "client_" + strconv.FormatUint(clientSeq.Add(1), 10),
		ws:           ws,
		conn:         conn,
		stats:        stats,
		limit:        cfg.ClientQueue,
		pingInterval: cfg.PingInterval,
		writeTimeout: cfg.WriteTimeout,
		done:         make(chan struct{}),
	}
	c.lastReads = conn.reads.Load()
	c.pinger = time.AfterFunc(time.Duration(math.MaxInt64), c.ping) // armed below, once c.pinger is set
	c.pinger.Reset(c.pingInterval)
	return c
}

// send queues a complete frame without blocking. A client whose queue is full
// is closed as a slow consumer and send reports false; a closing client drops
// frames silently.
func (c *Client) send(frame []byte) bool {
	c.mu.Lock()
	if c.closing.Load() {
		c.mu.Unlock()
		return false
	}
	if c.queue == nil {
		c.queue = batchPool.Get().(*batch)
	} else if len(c.queue.frames) >= c.limit {
		c.mu.Unlock()
		if c.closeWith(1013, "slow consumer") {
			c.stats.SlowConsumers.Add(1)
			// A writer stuck on a stalled peer gives up soon instead of after write_timeout.
			c.conn.SetWriteDeadline(time.Now().Add(closeGrace))
		}
		return false
	}
	c.queue.frames = append(c.queue.frames, frame)
	c.startWriterLocked()
	c.mu.Unlock()
	return true
}

func (c *Client) startWriterLocked() {
	if !c.writing {
		c.writing = true
		go c.flush()
	}
}

// closeWith asks the writer to send a close frame and end the connection;
// queued frames are dropped. Only the first call counts; it reports whether
// this was it. It never blocks.
func (c *Client) closeWith(code int, reason string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closing.Load() {
		return false
	}
	c.closeCode, c.closeReason = code, reason
	c.queue.recycle()
	c.queue = nil
	c.closing.Store(true)
	c.startWriterLocked()
	return true
}

// ping runs on the pinger's timer: it closes a peer from which nothing has
// arrived for two intervals (x/net/websocket swallows pongs, so any byte read
// counts), else queues a ping frame.
func (c *Client) ping() {
	if c.closing.Load() {
		return
	}
	if reads := c.conn.reads.Load(); reads != c.lastReads {
		c.lastReads, c.silent = reads, 0
	} else if c.silent++; c.silent >= 2 {
		c.closeWith(1001, "keep-alive timeout")
		return
	}
	if c.send(pingFrame) {
		c.pinger.Reset(c.pingInterval)
	}
}

// flush is the writer goroutine: it writes queued frames in batches, one
// writev per batch, until the queue is empty; once the client is closing it
// writes the close frame instead, half-closes and exits for good.
func (c *Client) flush() {
	for {
		c.mu.Lock()
		if c.closing.Load() {
			code, reason := c.closeCode, c.closeReason
			c.mu.Unlock()
			c.finish(code, reason)
			return
		}
		b := c.queue
		c.queue = nil
		if b == nil {
			c.writing = false
			c.mu.Unlock()
			return
		}
		c.mu.Unlock()

		timeout := c.writeTimeout
		if c.closing.Load() { // a slow consumer: see send
			timeout = closeGrace
		}
		if err := c.conn.writeFrames(b.frames, timeout); err != nil {
			c.closeWith(0, "") // a frame may be cut in half: no close frame can follow
			c.mu.Lock()
			c.closeCode = 0 // even if a close (1013 slow consumer, 1001 shutdown) was asked for first
			c.mu.Unlock()
		}
		b.recycle()
	}
}

// finish sends the close frame (unless code is 0), half-closes so the peer
// sees it before the socket goes, and bounds the wait for the peer's reply.
func (c *Client) finish(code int, reason string) {
	c.pinger.Stop()
	if code != 0 {
		msg := binary.BigEndian.AppendUint16(nil, uint16(code))
		msg = append(msg, reason[:min(len(reason), maxCloseReason)]...)
		c.conn.writeFrames([][]byte{encodeFrame(websocket.CloseFrame, msg)}, closeGrace) // not if x/net sent one
	}
	c.conn.CloseWrite()
	c.conn.SetReadDeadline(time.Now().Add(closeGrace))
	close(c.done)
}

// frameHeadroom is the largest WebSocket frame header: frames are built after
// it so the header can be put in front without copying the payload.
const frameHeadroom = 10

// putFrameHeader turns b[frameHeadroom:] into one unmasked server-to-client
// WebSocket frame (RFC 6455 section 5.2) by writing its header just before it.
func putFrameHeader(b []byte, opcode byte) []byte {
	n := len(b) - frameHeadroom
	var start int
	switch {
	case n <= 125:
		start = frameHeadroom - 2
		b[start+1] = byte(n)
	case n <= 0xffff:
		start = frameHeadroom - 4
		b[start+1] = 126
		binary.BigEndian.PutUint16(b[start+2:], uint16(n))
	default:
		start = 0
		b[1] = 127
		binary.BigEndian.PutUint64(b[2:], uint64(n))
	}
	b[start] = 0x80 | opcode // FIN + opcode
	return b[start:]
}

// encodeFrame returns payload as a complete frame. Frames are encoded once and
// written as they are, to every recipient.
func encodeFrame(opcode byte, payload []byte) []byte {
	b := make([]byte, frameHeadroom, frameHeadroom+len(payload))
	return putFrameHeader(append(b, payload...), opcode)
}

var pingFrame = encodeFrame(websocket.PingFrame, nil)

// batch is a client's queue. Batches are recycled across clients: a busy
// client holds one or two, an idle client none, and a steady stream of
// notifications allocates no queue memory.
type batch struct{ frames [][]byte }

var batchPool = sync.Pool{New: func() any { return new(batch) }}

func (b *batch) recycle() {
	if b != nil {
		clear(b.frames) // drop references so frames can be collected
		b.frames = b.frames[:0]
		batchPool.Put(b)
	}
}

// trackedConn is a server socket that counts reads (the keep-alive signal)
// and serializes writes: the writer's batches and x/net/websocket's own pong
// and close frames (each a single Write) never interleave. Once armed for a
// WebSocket, every write gets a fresh deadline and nothing follows a close
// frame (RFC 6455 section 5.5.1).
type trackedConn struct {
	net.Conn
	reads atomic.Uint64

	wmu          sync.Mutex
	writeTimeout time.Duration // 0 until armed: before the upgrade net/http writes; guarded by wmu
	closeSent    bool          // guarded by wmu
	bufs         net.Buffers   // guarded by wmu; a field, so that writev needs no allocation
}

func (c *trackedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.reads.Add(1)
	}
	return n, err
}

// arm switches the socket to WebSocket writes.
func (c *trackedConn) arm(writeTimeout time.Duration) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.writeTimeout = writeTimeout
}

// Write is used by net/http before the upgrade and by x/net/websocket after
// it, for pongs and protocol-error closes: a pong must not inherit the
// deadline of our last batch, long past.
func (c *trackedConn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.writeTimeout == 0 {
		return c.Conn.Write(p)
	}
	if c.closeSent {
		return 0, net.ErrClosed
	}
	c.Conn.SetWriteDeadline(time.Now().Add(c.writeTimeout))
	c.closeSent = len(p) > 0 && p[0]&0x0f == websocket.CloseFrame
	return c.Conn.Write(p)
}

// writeFrames writes complete frames within timeout, with as few system calls
// as the kernel allows (writev on TCP).
func (c *trackedConn) writeFrames(frames [][]byte, timeout time.Duration) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.closeSent {
		return net.ErrClosed
	}
	c.Conn.SetWriteDeadline(time.Now().Add(timeout))
	c.closeSent = frames[len(frames)-1][0]&0x0f == websocket.CloseFrame
	c.bufs = frames
	_, err := c.bufs.WriteTo(c.Conn)
	c.bufs = nil
	return err
}

func (c *trackedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// trackingListener wraps every accepted connection in a trackedConn.
type trackingListener struct{ net.Listener }

func (l trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &trackedConn{Conn: c}, nil
}

type connKey struct{}

// ---------------------------------------------------------------------------
// The service: listener state, HTTP endpoints and the WebSocket protocol

// Service ties the listener, the hub and the HTTP endpoints together.
type Service struct {
	cfg     Config
	log     *slog.Logger
	hub     *Hub
	stats   Stats
	started time.Time

	connected  atomic.Bool            // the listener has a connection
	listening  atomic.Bool            // every channel has been LISTENed
	reconnects atomic.Uint64          // connections re-established after a loss
	reason     atomic.Pointer[string] // why the listener is not connected
	wildcard   bool                   // AllowedOrigins contains "*"
	origins    map[string]bool        // AllowedOrigins otherwise
}

func newService(cfg Config, log *slog.Logger) *Service {
	s := &Service{cfg: cfg, log: log, started: time.Now(), origins: map[string]bool{}}
	s.hub = newHub(cfg.Notifier.MaxSubscriptions, &s.stats)
	for _, o := range cfg.Notifier.AllowedOrigins {
		o, _ = normalizeOrigin(o) // validated
		s.wildcard = s.wildcard || o == "*"
		s.origins[o] = true
	}
	s.setReason("connecting to the database")
	return s
}

func (s *Service) setReason(r string) { s.reason.Store(&r) }

// onListenerEvent is pq's event callback. It runs on pq's dispatch goroutine: no blocking.
func (s *Service) onListenerEvent(ev pq.ListenerEventType, err error) {
	switch ev {
	case pq.ListenerEventConnected:
		s.setReason("connected; LISTEN has not completed on every channel") // shown until it has
		s.connected.Store(true)
		s.log.Info("database listener connected")
	case pq.ListenerEventReconnected:
		s.connected.Store(true)
		s.reconnects.Add(1)
		s.log.Info("database listener reconnected")
	case pq.ListenerEventDisconnected:
		s.connected.Store(false)
		s.setReason("database connection lost: " + errText(err))
		s.log.Warn("database listener disconnected", "error", errText(err))
	case pq.ListenerEventConnectionAttemptFailed:
		s.connected.Store(false)
		s.setReason("cannot connect to the database: " + errText(err))
		s.log.Warn("database connection attempt failed", "error", errText(err))
	}
}

func errText(err error) string {
	if err == nil {
		return "unknown error"
	}
	return err.Error()
}

// runListener LISTENs on every channel and feeds the hub until ctx ends or l
// is closed. It never blocks on clients, so pq's buffer never backs up.
func (s *Service) runListener(ctx context.Context, l Listener) {
	go func() {
		// Listen blocks while the database is unreachable; pq re-LISTENs by itself after a reconnect.
		// A LISTEN the server refuses (a hot standby in recovery, say) is retried and shown by /health.
		for _, ch := range s.cfg.Notifier.Channels {
			for {
				err := l.Listen(ch)
				if err == nil || errors.Is(err, pq.ErrChannelAlreadyOpen) {
					break
				}
				if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
					return
				}
				retry := s.cfg.Database.ReconnectMaxInterval
				s.setReason(fmt.Sprintf("LISTEN %s failed: %v", ch, err))
				s.log.Error("cannot LISTEN; retrying", "channel", ch, "error", err.Error(), "retry_in", retry.String())
				select {
				case <-ctx.Done():
					return
				case <-time.After(retry):
				}
			}
		}
		s.listening.Store(true)
		s.log.Info("listening for notifications", "channels", s.cfg.Notifier.Channels)
		if clients, _ := s.hub.counts(); clients > 0 { // they connected while the database was unreachable
			s.resync("database connection established; notifications sent before may have been missed")
		}
	}()
	notifications := l.NotificationChannel()
	for {
		select {
		case <-ctx.Done():
			return
		case n, ok := <-notifications:
			if !ok {
				return
			}
			if n == nil {
				s.resync("database connection was re-established; notifications may have been missed")
				continue
			}
			s.ingest(n.Channel, n.Extra, time.Now())
		}
	}
}

// ingest validates one NOTIFY and dispatches it.
func (s *Service) ingest(channel, payload string, now time.Time) {
	s.stats.Received.Add(1)
	n, err := parseNotification(channel, payload, now)
	if err != nil {
		s.stats.Dropped.Add(1)
		s.log.Warn("dropped notification", "channel", channel, "error", err.Error(),
			"payload", payload[:min(len(payload), logPayloadBytes)])
		return
	}
	s.hub.dispatch(n)
}

// resync tells every client that notifications may have been lost. The frame
// also carries notification_type and payload so that clients written for plain
// notifications (the original examples) handle it without crashing.
func (s *Service) resync(reason string) {
	s.stats.Resyncs.Add(1)
	s.log.Warn("telling clients to resync", "reason", reason)
	frame := fmt.Appendf(nil, `{"type":"resync","notification_type":"resync","reason":%q,"payload":{},"timestamp":"%s"}`,
		reason, appendTimestamp(nil, time.Now()))
	s.hub.broadcast(encodeFrame(websocket.TextFrame, frame))
}

// watchListener pings the listener; a ping that hangs means a silently dead
// TCP session, so the connection is cut and pq reconnects.
func (s *Service) watchListener(ctx context.Context, l Listener, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if !s.connected.Load() {
			continue
		}
		errc := make(chan error, 1)
		go func() { errc <- l.Ping() }()
		select {
		case <-errc: // an error means pq already knows the connection is gone
		case <-time.After(s.cfg.Database.PingTimeout):
			s.log.Warn("database listener did not answer a ping; reconnecting", "timeout", s.cfg.Database.PingTimeout.String())
			s.connected.Store(false)
			s.setReason("database listener did not answer a ping")
			l.Reset()
		case <-ctx.Done():
			return
		}
	}
}

// handler serves every endpoint. Errors are JSON: {"error": "..."}.
func (s *Service) handler() http.Handler {
	ws := websocket.Server{
		Handshake: func(c *websocket.Config, _ *http.Request) error {
			c.Protocol = nil // no subprotocols; origins are checked in serveWS
			return nil
		},
		Handler: s.serveClient,
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.cors(w, r)
		if r.Method == http.MethodOptions {
			w.Header().Set("Allow", "GET, OPTIONS")
			w.WriteHeader(http.StatusNoContent)
			return
		}
		switch r.URL.Path {
		case "/health", "/stats", "/ws":
		default:
			writeJSON(w, http.StatusNotFound, map[string]string{"error": "not found; endpoints are /ws, /health and /stats"})
			return
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, OPTIONS")
			writeJSON(w, http.StatusMethodNotAllowed, map[string]string{"error": "method not allowed; use GET"})
			return
		}
		switch r.URL.Path {
		case "/health":
			s.serveHealth(w)
		case "/stats":
			s.serveStats(w)
		default:
			s.serveWS(w, r, ws)
		}
	})
}

// cors allows browsers on the configured origins to read /health and /stats.
func (s *Service) cors(w http.ResponseWriter, r *http.Request) {
	origin := r.Header.Get("Origin")
	h := w.Header()
	switch {
	case s.wildcard:
		h.Set("Access-Control-Allow-Origin", "*")
	case origin != "" && s.origins[strings.ToLower(origin)]:
		h.Set("Access-Control-Allow-Origin", origin)
		h.Add("Vary", "Origin")
	default:
		return
	}
	if r.Method == http.MethodOptions {
		h.Set("Access-Control-Allow-Methods", "GET, OPTIONS")
		if req := r.Header.Get("Access-Control-Request-Headers"); req != "" {
			h.Set("Access-Control-Allow-Headers", req)
		}
		h.Set("Access-Control-Max-Age", "600")
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func (s *Service) serveHealth(w http.ResponseWriter) {
	if s.connected.Load() && s.listening.Load() {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
		return
	}
	writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "unavailable", "reason": *s.reason.Load()})
}

func (s *Service) serveStats(w http.ResponseWriter) {
	clients, subs := s.hub.counts()
	writeJSON(w, http.StatusOK, map[string]any{
		"connected_clients":         clients,
		"total_subscriptions":       subs,
		"notifications_received":    s.stats.Received.Load(),
		"notifications_delivered":   s.stats.Delivered.Load(),
		"notifications_dropped":     s.stats.Dropped.Load(),
		"slow_consumer_disconnects": s.stats.SlowConsumers.Load(),
		"client_errors":             s.stats.ClientErrors.Load(),
		"resyncs":                   s.stats.Resyncs.Load(),
		"listener_connected":        s.connected.Load() && s.listening.Load(),
		"listener_reconnects":       s.reconnects.Load(),
		"uptime_seconds":            int64(time.Since(s.started).Seconds()),
		"max_connections":           s.cfg.Notifier.MaxConnections,
		"version":                   buildVersion(),
	})
}

// serveWS checks the origin and the connection limit, then upgrades.
func (s *Service) serveWS(w http.ResponseWriter, r *http.Request, ws websocket.Server) {
	if !strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
		writeJSON(w, http.StatusUpgradeRequired, map[string]string{"error": "this endpoint speaks WebSocket; connect with a WebSocket client"})
		return
	}
	// Browsers always send Origin; clients without one (CLIs, scripts) are let in.
	if origin := r.Header.Get("Origin"); origin != "" && !s.wildcard && !s.origins[strings.ToLower(origin)] {
		writeJSON(w, http.StatusForbidden, map[string]string{"error": "origin not allowed: " + origin})
		return
	}
	if !s.hub.reserve(s.cfg.Notifier.MaxConnections) {
		writeJSON(w, http.StatusServiceUnavailable, map[string]any{
			"error": "too many connections", "max_connections": s.cfg.Notifier.MaxConnections})
		return
	}
	defer s.hub.release()
	ws.ServeHTTP(smallBuffers{w}, r)
}

// smallBuffers gives x/net/websocket small buffers when it hijacks the
// connection: after the handshake it only reads small client messages and
// writes pongs (our frames bypass it, see trackedConn). net/http's own 4 KiB
// buffers stay referenced by its connection but are never touched again, which
// saves 3 KiB of resident memory per idle connection (BenchmarkIdleConnections).
type smallBuffers struct{ http.ResponseWriter }

func (w smallBuffers) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, rw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	var r io.Reader = conn
	if n := rw.Reader.Buffered(); n > 0 { // the client wrote before seeing our handshake response
		early, _ := rw.Reader.Peek(n)
		r = io.MultiReader(bytes.NewReader(bytes.Clone(early)), conn)
	}
	return conn, bufio.NewReadWriter(bufio.NewReaderSize(r, wsReadBuffer), bufio.NewWriterSize(conn, wsWriteBuffer)), nil
}

// serveClient runs one WebSocket connection: it is the reader; Client.flush is the writer.
func (s *Service) serveClient(ws *websocket.Conn) {
	conn, _ := ws.Request().Context().Value(connKey{}).(*trackedConn)
	if conn == nil { // not served through trackingListener: a programming error
		s.log.Error("websocket connection without a tracked socket")
		return
	}
	ws.MaxPayloadBytes = s.cfg.Notifier.MaxMessageBytes
	conn.arm(s.cfg.Notifier.WriteTimeout)
	c := newClient(ws, conn, &s.stats, s.cfg.Notifier)
	if !s.hub.register(c) {
		c.closeWith(1001, "server shutting down")
		<-c.done
		return
	}
	defer s.hub.unregister(c)
	log := s.log.With("client_id", c.id, "remote", ws.Request().RemoteAddr)
	log.Debug("client connected")

	for {
		var m frameIn
		err := rawCodec.Receive(ws, &m)
		if err == nil {
			if !c.closing.Load() { // once closing, read on until the peer's close reply
				s.handleMessage(c, m)
			}
			continue
		}
		if errors.Is(err, websocket.ErrFrameTooLarge) { // the next read skips the rest of the frame
			c.closeWith(1009, fmt.Sprintf("message too big (limit %d bytes)", s.cfg.Notifier.MaxMessageBytes))
			continue
		}
		// The peer sent a close frame (x/net reports io.EOF, and answers protocol
		// errors with its own close, after which ours is not sent), went away, or
		// did not answer our close in time.
		c.closeWith(1000, "")
		break
	}
	<-c.done // the writer has finished; x/net/websocket closes the socket when we return
	log.Debug("client disconnected")
}

// frameIn is one frame received from a client.
type frameIn struct {
	data []byte
	kind byte
}

var rawCodec = websocket.Codec{
	Unmarshal: func(data []byte, kind byte, v any) error {
		*v.(*frameIn) = frameIn{data, kind}
		return nil
	},
}

// clientMessage is what a client may send.
type clientMessage struct {
	Type   json.RawMessage `json:"type"`
	Filter json.RawMessage `json:"filter"`
	ID     json.RawMessage `json:"id"`
}

// reply is what the server answers; ID is echoed verbatim.
type reply struct {
	Type    string          `json:"type"`
	ID      json.RawMessage `json:"id,omitempty"`
	Filter  string          `json:"filter,omitempty"`
	Message string          `json:"message,omitempty"`
}

func (r reply) frame() []byte {
	b, _ := json.Marshal(r)
	return encodeFrame(websocket.TextFrame, b)
}

// handleMessage applies one client message, answering errors with an error frame.
func (s *Service) handleMessage(c *Client, in frameIn) {
	msg, filter, err := parseClientMessage(in)
	if err == nil && (msg.kind == "subscribe" || msg.kind == "unsubscribe") {
		var f Filter
		if f, err = ParseFilter(filter); err == nil {
			var ack []byte
			if msg.id != nil {
				ack = reply{Type: msg.kind + "d", ID: msg.id, Filter: filter}.frame()
			}
			if msg.kind == "subscribe" {
				if err = s.hub.subscribe(c, f, ack); errors.Is(err, errTooManySubscriptions) {
					err = fmt.Errorf("too many subscriptions (limit %d)", s.cfg.Notifier.MaxSubscriptions)
				}
			} else {
				s.hub.unsubscribe(c, f, ack)
			}
		}
	} else if err == nil && msg.id != nil { // ping
		c.send(reply{Type: "pong", ID: msg.id}.frame())
	}
	if err != nil {
		s.stats.ClientErrors.Add(1)
		c.send(reply{Type: "error", ID: msg.id, Message: err.Error()}.frame())
	}
}

// parsedMessage is a client message whose shape has been checked.
type parsedMessage struct {
	kind string          // subscribe, unsubscribe or ping
	id   json.RawMessage // nil when absent
}

// parseClientMessage checks a frame's shape; the id is returned even with an
// error so that the error frame can echo it.
func parseClientMessage(in frameIn) (parsedMessage, string, error) {
	var pm parsedMessage
	if in.kind != websocket.TextFrame {
		return pm, "", errors.New("binary frames are not supported; send JSON text frames")
	}
	data := bytes.TrimSpace(in.data)
	if !utf8.Valid(data) { // encoding/json would pass it through, and browsers fail on it
		return pm, "", errors.New("message is not valid UTF-8")
	}
	var m clientMessage
	if err := json.Unmarshal(data, &m); err != nil {
		if json.Valid(data) {
			return pm, "", errors.New("message must be a JSON object")
		}
		return pm, "", errors.New("invalid JSON")
	}
	if len(data) == 0 || data[0] != '{' {
		return pm, "", errors.New("message must be a JSON object")
	}
	if len(m.ID) > 0 && !bytes.Equal(m.ID, []byte("null")) {
		if m.ID[0] != '"' && m.ID[0] != '-' && (m.ID[0] < '0' || m.ID[0] > '9') {
			return pm, "", errors.New(`"id" must be a string or a number`)
		}
		pm.id = m.ID
	}
	var kind string
	if len(m.Type) == 0 || bytes.Equal(m.Type, []byte("null")) {
		return pm, "", errors.New(`missing "type"; expected subscribe, unsubscribe or ping`)
	}
	if err := json.Unmarshal(m.Type, &kind); err != nil {
		return pm, "", errors.New(`"type" must be a string`)
	}
	switch kind {
	case "ping":
		pm.kind = kind
		return pm, "", nil
	case "subscribe", "unsubscribe":
		pm.kind = kind
	default:
		return pm, "", fmt.Errorf("unknown type %q; expected subscribe, unsubscribe or ping", kind)
	}
	var filter string
	if len(m.Filter) == 0 || bytes.Equal(m.Filter, []byte("null")) {
		return pm, "", fmt.Errorf(`missing "filter" in %s`, kind)
	}
	if err := json.Unmarshal(m.Filter, &filter); err != nil {
		return pm, "", errors.New(`"filter" must be a string`)
	}
	return pm, filter, nil
}

// ---------------------------------------------------------------------------
// main

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Environ(), os.Stdout, os.Stderr))
}

// run is the whole program; it returns the exit code: 0 after a clean
// shutdown, 1 on a runtime failure, 2 for bad flags or configuration.
func run(ctx context.Context, args, env []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("attune-notifier", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors and --help are printed below, once
	configPath := fs.String("config", "", "YAML configuration `file` (default $ATTUNE_CONFIG, else ./config.notifier.yaml if present)")
	logLevel := fs.String("log-level", "", "override log.level: debug, info, warn or error")
	showVersion := fs.Bool("version", false, "print the version and exit")
	healthcheck := fs.Bool("healthcheck", false, "query /health of the running service and exit 0 if healthy (for container HEALTHCHECK)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: attune-notifier [flags]\n\nattune-notifier turns PostgreSQL NOTIFY events into WebSocket notifications.\nEnvironment variables ATTUNE__SECTION__KEY override the configuration file.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(stdout)
			fs.Usage()
			return 0
		}
		fmt.Fprintf(stderr, "attune-notifier: %v (see --help)\n", err)
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "attune-notifier: unexpected argument %q (see --help)\n", fs.Arg(0))
		return 2
	}
	if *showVersion {
		fmt.Fprintln(stdout, "attune-notifier", buildVersion())
		return 0
	}

	path := *configPath
	if path == "" {
		path = lookupEnv(env, "ATTUNE_CONFIG")
	}
	if path == "" {
		if _, err := os.Stat("config.notifier.yaml"); err == nil {
			path = "config.notifier.yaml"
		}
	}
	cfg, warnings, err := loadConfig(path, env)
	if err == nil && *logLevel != "" {
		cfg.Log.Level = *logLevel
		if _, lerr := parseLevel(*logLevel); lerr != nil {
			err = fmt.Errorf("--log-level: %v", lerr)
		}
	}
	if err != nil {
		fmt.Fprintf(stderr, "attune-notifier: invalid configuration: %v\n", err)
		return 2
	}
	if *healthcheck {
		return checkHealth(cfg, stdout, stderr)
	}

	log := newLogger(cfg.Log, stderr).With("service", cfg.ServiceName)
	for _, w := range warnings {
		log.Warn(w)
	}
	addr := net.JoinHostPort(cfg.Notifier.Host, strconv.Itoa(cfg.Notifier.Port))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintf(stderr, "attune-notifier: cannot listen on %s: %v\n", addr, err)
		log.Error("cannot listen", "addr", addr, "error", err)
		return 1
	}
	source := path
	if source == "" {
		source = "built-in defaults"
	}
	log.Info("starting", "version", buildVersion(), "addr", ln.Addr().String(), "config", source,
		"environment", cfg.Environment, "database", redactDSN(cfg.Database.URL, cfg.Database.URL))

	s := newService(cfg, log)
	l := newPGListener(cfg.Database, s.onListenerEvent)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	listenerDone := make(chan struct{})
	go func() { defer close(listenerDone); s.runListener(ctx, l) }()
	go s.watchListener(ctx, l, listenerPingEvery)

	srv := s.httpServer()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(trackingListener{ln}) }()
	select {
	case <-ctx.Done():
	case err := <-served:
		log.Error("server failed", "error", err)
		return 1
	}
	s.shutdown(srv, l, listenerDone)
	return 0
}

// httpServer returns the HTTP server; it must serve a trackingListener.
func (s *Service) httpServer() *http.Server {
	return &http.Server{
		Handler:           s.handler(),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       120 * time.Second,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, connKey{}, c)
		},
	}
}

// shutdown stops accepting, closes every client with 1001, closes the listener,
// all within notifier.shutdown_timeout.
func (s *Service) shutdown(srv *http.Server, l Listener, listenerDone <-chan struct{}) {
	timeout := s.cfg.Notifier.ShutdownTimeout
	s.log.Info("shutting down", "timeout", timeout.String())
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	go srv.Shutdown(ctx) // stops accepting; hijacked WebSocket connections are ours to close
	s.hub.closeAll(1001, "server shutting down")
	// Leave a quarter of the budget for cutting the sockets of clients that did not close in time.
	graceful, cancelGraceful := context.WithTimeout(ctx, timeout*3/4)
	defer cancelGraceful()
	if err := s.hub.wait(graceful); err != nil {
		clients, _ := s.hub.counts()
		s.log.Warn("clients did not close in time; cutting their connections", "clients", clients)
		s.hub.forceClose()
		s.hub.wait(ctx)
	}
	closed := make(chan struct{})
	go func() { l.Close(); <-listenerDone; close(closed) }()
	select {
	case <-closed:
	case <-ctx.Done():
		select {
		case <-closed:
		case <-time.After(10 * time.Millisecond): // the budget may have gone on clients; Close is quick
			s.log.Warn("database listener did not close in time")
		}
	}
	s.log.Info("stopped")
}

// checkHealth is --healthcheck: it asks the running service's /health.
func checkHealth(cfg Config, stdout, stderr io.Writer) int {
	host := cfg.Notifier.Host
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		host = "127.0.0.1"
	}
	u := "http://" + net.JoinHostPort(host, strconv.Itoa(cfg.Notifier.Port)) + "/health"
	client := &http.Client{Timeout: healthcheckTimeout}
	resp, err := client.Get(u)
	if err != nil {
		fmt.Fprintf(stderr, "attune-notifier: healthcheck: %v\n", err)
		return 1
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	fmt.Fprintf(stdout, "%s", body)
	if resp.StatusCode != http.StatusOK {
		return 1
	}
	return 0
}

func lookupEnv(env []string, name string) string {
	for _, kv := range env {
		if k, v, ok := strings.Cut(kv, "="); ok && k == name {
			return v
		}
	}
	return ""
}

func buildVersion() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		return bi.Main.Version
	}
	return "(devel)"
}
