package cli

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/store/etcdstore"
)

// serverStoreFlags choose where the server keeps its state: the embedded
// bbolt file in --data-dir (one server), or etcd shared by N replicas.
type serverStoreFlags struct {
	backend   string
	endpoints []string
	caFile    string
	certFile  string
	keyFile   string
	prefix    string
	replicaID string
	leaseTTL  time.Duration
}

func (f *serverStoreFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&f.backend, "store", "bolt", "where state is kept: bolt (a file in --data-dir, one server) or etcd (--etcd-endpoints, shared by every replica; one leads the CA lifecycle)")
	fs.StringSliceVar(&f.endpoints, "etcd-endpoints", nil, "etcd client URLs for --store etcd, comma-separated (https://e1:2379,https://e2:2379,https://e3:2379)")
	fs.StringVar(&f.caFile, "etcd-ca", "", "PEM CA bundle that signed the etcd servers' certificates (--store etcd over https)")
	fs.StringVar(&f.certFile, "etcd-cert", "", "PEM client certificate for etcd (with --etcd-key)")
	fs.StringVar(&f.keyFile, "etcd-key", "", "PEM private key of --etcd-cert")
	fs.StringVar(&f.prefix, "etcd-prefix", etcdstore.DefaultPrefix, "key prefix of this meshid plane in etcd; planes sharing one etcd need different prefixes")
	fs.StringVar(&f.replicaID, "replica-id", "", "this replica's name in the election and in 'meshid status' (default: the host name; on Kubernetes the pod name)")
	durationFlag(fs, &f.leaseTTL, "etcd-lease-ttl", etcdstore.DefaultLeaseTTL, "lease of the leader election: a dead leader is replaced within it")
}

// setup opens the etcd store when --store etcd asks for it and puts it in
// cfg (the server closes it); for bolt it only checks that no etcd flag was
// given by mistake.
func (f *serverStoreFlags) setup(ctx context.Context, cfg *controlplane.Config, kekFlag string, log *slog.Logger) error {
	switch f.backend {
	case "bolt":
		if len(f.endpoints) > 0 || f.caFile != "" || f.certFile != "" || f.keyFile != "" {
			return errors.New("--etcd-* flags need --store etcd")
		}
		return nil
	case "etcd":
	default:
		return fmt.Errorf("--store %q: want bolt or etcd", f.backend)
	}
	opts, err := f.options(log)
	if err != nil {
		return err
	}
	if kekFlag == "" {
		return errors.New("--store etcd needs --kek-file: the same key file on every replica, made once with 'meshid kek create FILE' (a replica never makes its own)")
	}
	opts.Now = cfg.Now
	octx, cancel := context.WithTimeout(ctx, opts.DialTimeout+opts.RequestTimeout)
	defer cancel()
	st, err := etcdstore.Open(octx, opts)
	if err != nil {
		return fmt.Errorf("--store etcd: %w", err)
	}
	cfg.Store = st
	cfg.SharedKEK = true
	return nil
}

// options turns the flags into etcdstore.Options, refusing what could
// only fail later (a missing file, http with a client certificate).
func (f *serverStoreFlags) options(log *slog.Logger) (etcdstore.Options, error) {
	if len(f.endpoints) == 0 {
		return etcdstore.Options{}, errors.New("--store etcd needs --etcd-endpoints")
	}
	if !strings.HasSuffix(f.prefix, "/") || !strings.HasPrefix(f.prefix, "/") {
		return etcdstore.Options{}, fmt.Errorf("--etcd-prefix %q: want a path that starts and ends with /", f.prefix)
	}
	if f.leaseTTL < 2*time.Second {
		return etcdstore.Options{}, fmt.Errorf("--etcd-lease-ttl %s: at least 2s (etcd's lease granularity is a second)", f.leaseTTL)
	}
	secure := 0
	for _, e := range f.endpoints {
		u, err := url.Parse(e)
		if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") || (u.Path != "" && u.Path != "/") {
			return etcdstore.Options{}, fmt.Errorf("--etcd-endpoints: %q is not an etcd client URL (http(s)://host:port)", e)
		}
		if u.Scheme == "https" {
			secure++
		} else if host := u.Hostname(); host != "localhost" && !isLoopback(host) {
			log.Warn("etcd endpoint without TLS: meshid's state, sealed CA keys included, crosses the network in clear", "endpoint", e)
		}
	}
	if secure != 0 && secure != len(f.endpoints) {
		return etcdstore.Options{}, errors.New("--etcd-endpoints: mix of http and https endpoints")
	}
	if (f.certFile == "") != (f.keyFile == "") {
		return etcdstore.Options{}, errors.New("--etcd-cert and --etcd-key go together")
	}
	opts := etcdstore.Options{
		Endpoints: f.endpoints, Prefix: f.prefix, Replica: f.replicaID, LeaseTTL: f.leaseTTL,
		DialTimeout: 5 * time.Second, RequestTimeout: 5 * time.Second, Logger: log,
	}
	if opts.Replica == "" {
		opts.Replica = defaultReplicaID()
	}
	if secure == 0 {
		if f.caFile != "" || f.certFile != "" {
			return etcdstore.Options{}, errors.New("--etcd-ca/--etcd-cert need https:// endpoints")
		}
		return opts, nil
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if f.caFile != "" {
		pem, err := os.ReadFile(f.caFile)
		if err != nil {
			return etcdstore.Options{}, fmt.Errorf("--etcd-ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return etcdstore.Options{}, fmt.Errorf("--etcd-ca %s: no PEM certificate in it", f.caFile)
		}
		tc.RootCAs = pool
	}
	if f.certFile != "" {
		c, err := tls.LoadX509KeyPair(f.certFile, f.keyFile)
		if err != nil {
			return etcdstore.Options{}, fmt.Errorf("--etcd-cert/--etcd-key: %w", err)
		}
		tc.Certificates = []tls.Certificate{c}
	}
	opts.TLS = tc
	return opts, nil
}

// defaultReplicaID is the host name (a pod's name on Kubernetes), which
// is unique among replicas and stable across restarts of one.
func defaultReplicaID() string {
	if h, err := os.Hostname(); err == nil && h != "" {
		return h
	}
	return fmt.Sprintf("pid-%d", os.Getpid())
}

func isLoopback(host string) bool {
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
