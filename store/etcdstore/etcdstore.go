// Package etcdstore is the Store for N meshid replicas sharing one etcd
// cluster (issue 13). This file fixes the API the server and CLI are wired
// against; the implementation lands behind it.
package etcdstore

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"time"
)

// DefaultPrefix is the key prefix when Options.Prefix is empty.
const DefaultPrefix = "/meshid/"

// DefaultLeaseTTL is the leader election lease when Options.LeaseTTL is 0:
// a dead leader is replaced within it.
const DefaultLeaseTTL = 10 * time.Second

// Options configures Open.
type Options struct {
	// Endpoints are the etcd client URLs (https://e1:2379, ...).
	Endpoints []string
	// TLS is the client TLS config (CA, client cert); nil for plain http
	// endpoints (tests on loopback).
	TLS *tls.Config
	// Prefix is prepended to every key, so several meshid planes (or a
	// test per prefix) can share one etcd; DefaultPrefix when empty. It
	// must end in "/".
	Prefix string
	// Replica names this process in the election and in Cluster (default:
	// the host name and pid).
	Replica string
	// LeaseTTL is the election lease; DefaultLeaseTTL when 0.
	LeaseTTL time.Duration
	// DialTimeout bounds the first connection (default 5s); RequestTimeout
	// bounds each write, after which it fails with store.ErrUnavailable
	// (default 5s).
	DialTimeout, RequestTimeout time.Duration
	Logger                      *slog.Logger
	// Now stamps what the store itself decides by time (token expiry in
	// UseToken is the caller's now).
	Now func() time.Time
}

// Store is a store.Store on etcd.
type Store struct{}

// Open connects to etcd and returns a Store once a linearizable read has
// succeeded, so a misconfigured endpoint fails at start-up.
func Open(ctx context.Context, opts Options) (*Store, error) {
	return nil, errors.New("etcdstore: not implemented yet")
}
