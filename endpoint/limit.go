package endpoint

import (
	"log/slog"
	"math"
	"net"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/credentials"
)

// Refusal reasons, the "reason" label of meshid_connections_refused_total.
const (
	ReasonListenerLimit = "listener_limit"
	ReasonUIDLimit      = "uid_limit"
)

// Defaults of the connection limits.
const (
	DefaultMaxConnections       = 8192
	DefaultMaxConnectionsPerUID = 256
	// DefaultAdminMaxConnections is the admin socket's own cap: it is
	// counted apart from every other listener, so a flood elsewhere never
	// takes the operator's way in.
	DefaultAdminMaxConnections = 64
	// FDReserve is kept free of every listener cap for the store, key
	// files, metrics scrapes and outgoing connections.
	FDReserve = 128
	// DefaultRefusalLogInterval spaces the refusal log lines.
	DefaultRefusalLogInterval = 10 * time.Second
)

// ConnMetrics are the connection-limit metrics, shared by all listeners of
// a server and told apart by the "listener" label.
type ConnMetrics struct {
	Open    *prometheus.GaugeVec
	Refused *prometheus.CounterVec
}

// NewConnMetrics creates the metrics and registers them with reg.
func NewConnMetrics(reg prometheus.Registerer) *ConnMetrics {
	m := &ConnMetrics{
		Open: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "meshid_connections_open",
			Help: "Connections currently held, by listener (admin, workload, sds_tcp, sds_rest).",
		}, []string{"listener"}),
		Refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshid_connections_refused_total",
			Help: "Connections closed at accept because a limit was reached, by listener and reason (listener_limit, uid_limit).",
		}, []string{"listener", "reason"}),
	}
	reg.MustRegister(m.Open, m.Refused)
	return m
}

// Limits bounds the connections one listener holds at once.
type Limits struct {
	// Name labels the listener in metrics and logs.
	Name string
	// Max is the most connections held at once; 0 means no limit.
	Max int
	// MaxPerUID is the most held at once per peer uid (unix sockets
	// only); 0 means no limit.
	MaxPerUID int
	// LogInterval spaces refusal log lines (default 10 s).
	LogInterval time.Duration
}

// Listener is a net.Listener that closes, at accept, every connection
// beyond its limits; the caller never sees those. Refusals are counted in
// the metrics and logged at most once per LogInterval, each line carrying
// the counts since the previous one.
type Listener struct {
	net.Listener
	lim Limits
	m   *ConnMetrics
	log *slog.Logger
	now func() time.Time

	mu      sync.Mutex
	open    int
	perUID  map[uint32]int
	pending map[string]int
	lastLog time.Time
}

// Limit wraps l with lim. m may be nil (no metrics).
func Limit(l net.Listener, lim Limits, m *ConnMetrics, log *slog.Logger) *Listener {
	if lim.LogInterval <= 0 {
		lim.LogInterval = DefaultRefusalLogInterval
	}
	if m != nil {
		m.Open.WithLabelValues(lim.Name).Set(0)
	}
	return &Listener{Listener: l, lim: lim, m: m, log: log, now: time.Now,
		perUID: map[uint32]int{}, pending: map[string]int{}}
}

// Accept returns the next connection within the limits.
func (l *Listener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		uid, hasUID := uint32(0), false
		if l.lim.MaxPerUID > 0 {
			uid, hasUID = peerUID(c)
		}
		if reason := l.admit(uid, hasUID); reason != "" {
			c.Close()
			l.refused(reason)
			continue
		}
		return &conn{Conn: c, rel: &release{l: l, uid: uid, hasUID: hasUID}}, nil
	}
}

func (l *Listener) admit(uid uint32, hasUID bool) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.lim.Max > 0 && l.open >= l.lim.Max {
		return ReasonListenerLimit
	}
	if hasUID && l.perUID[uid] >= l.lim.MaxPerUID {
		return ReasonUIDLimit
	}
	l.open++
	if hasUID {
		l.perUID[uid]++
	}
	if l.m != nil {
		l.m.Open.WithLabelValues(l.lim.Name).Inc()
	}
	return ""
}

func (l *Listener) done(uid uint32, hasUID bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.open--
	if hasUID {
		if l.perUID[uid]--; l.perUID[uid] <= 0 {
			delete(l.perUID, uid)
		}
	}
	if l.m != nil {
		l.m.Open.WithLabelValues(l.lim.Name).Dec()
	}
}

func (l *Listener) refused(reason string) {
	if l.m != nil {
		// Counted after the log line, so a count seen means its line was written.
		defer l.m.Refused.WithLabelValues(l.lim.Name, reason).Inc()
	}
	l.mu.Lock()
	l.pending[reason]++
	now := l.now()
	if !l.lastLog.IsZero() && now.Sub(l.lastLog) < l.lim.LogInterval {
		l.mu.Unlock()
		return
	}
	reasons := make([]string, 0, len(l.pending))
	for r := range l.pending {
		reasons = append(reasons, r)
	}
	sort.Strings(reasons)
	args := []any{"listener", l.lim.Name, "open", l.open, "max", l.lim.Max, "max_per_uid", l.lim.MaxPerUID}
	total := 0
	for _, r := range reasons {
		args = append(args, "refused_"+r, l.pending[r])
		total += l.pending[r]
		delete(l.pending, r)
	}
	since := l.lastLog
	l.lastLog = now
	l.mu.Unlock()
	if !since.IsZero() {
		args = append(args, "since", since.UTC().Format(time.RFC3339))
	}
	if l.log != nil {
		l.log.Warn("connections refused: limit reached", append(args, "refused", total)...)
	}
}

func peerUID(c net.Conn) (uint32, bool) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return 0, false
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return 0, false
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil || credErr != nil {
		return 0, false
	}
	return cred.Uid, true
}

// release gives a connection's slot back exactly once, whichever of its
// wrappers is closed.
type release struct {
	once   sync.Once
	l      *Listener
	uid    uint32
	hasUID bool
}

func (r *release) do() { r.once.Do(func() { r.l.done(r.uid, r.hasUID) }) }

type conn struct {
	net.Conn
	rel *release
}

func (c *conn) Close() error {
	err := c.Conn.Close()
	c.rel.do()
	return err
}

// Credentials adapts transport credentials that need the accepted
// connection's concrete type (unix peer credentials read SO_PEERCRED from a
// *net.UnixConn) to a Listener's connections: the handshake sees the
// original connection, and the connection it returns keeps the slot.
func Credentials(inner credentials.TransportCredentials) credentials.TransportCredentials {
	return creds{inner}
}

type creds struct {
	credentials.TransportCredentials
}

func (c creds) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	lc, ok := raw.(*conn)
	if !ok {
		return c.TransportCredentials.ServerHandshake(raw)
	}
	hc, ai, err := c.TransportCredentials.ServerHandshake(lc.Conn)
	if err != nil {
		return nil, nil, err // gRPC closes raw, which releases the slot
	}
	return &conn{Conn: hc, rel: lc.rel}, ai, nil
}

func (c creds) Clone() credentials.TransportCredentials {
	return creds{c.TransportCredentials.Clone()}
}

// FileLimit is the process's open-file limit (RLIMIT_NOFILE, soft), or 0
// when it cannot be read or is unlimited.
func FileLimit() int {
	var r unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &r); err != nil || r.Cur == unix.RLIM_INFINITY || r.Cur > math.MaxInt32 {
		return 0
	}
	return int(r.Cur)
}

// FitCaps scales caps down, in proportion, so that they, the admin cap and
// reserve together stay under fileLimit; the admin cap is never scaled. A
// zero cap (no limit) counts as fileLimit. It reports whether it scaled.
// fileLimit 0 means unknown: caps are returned as they are.
func FitCaps(fileLimit, reserve, admin int, caps []int) ([]int, bool) {
	out := append([]int(nil), caps...)
	if fileLimit <= 0 || len(caps) == 0 {
		return out, false
	}
	avail := fileLimit - reserve - admin
	if avail < len(caps) {
		avail = len(caps)
	}
	sum := 0
	for i, c := range out {
		if c <= 0 {
			out[i] = fileLimit
		}
		sum += out[i]
	}
	if sum <= avail {
		return caps, false
	}
	for i, c := range out {
		out[i] = max(1, int(int64(c)*int64(avail)/int64(sum)))
	}
	return out, true
}
