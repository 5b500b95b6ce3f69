package attest

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/grpc/peer"
)

// BenchmarkAttestConnection is the attestation cost of one workload-socket
// connection and one RPC on it: the server handshake (peer credentials,
// pidfd, start time) and CallerFromContext (executable path, cached
// digest, re-check). The dial and accept are in the loop too.
func BenchmarkAttestConnection(b *testing.B) {
	dir, err := os.MkdirTemp("", "meshid-attest-")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	lis, err := net.Listen("unix", filepath.Join(dir, "s"))
	if err != nil {
		b.Fatal(err)
	}
	defer lis.Close()
	creds := UnixCredentials()
	for b.Loop() {
		c, err := net.Dial("unix", lis.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		raw, err := lis.Accept()
		if err != nil {
			b.Fatal(err)
		}
		conn, info, err := creds.ServerHandshake(raw)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := CallerFromContext(peer.NewContext(context.Background(), &peer.Peer{AuthInfo: info})); err != nil {
			b.Fatal(err)
		}
		conn.Close()
		c.Close()
	}
}

// BenchmarkPeerCredOnly is the same loop with only the SO_PEERCRED read
// (the attestation before the process was tracked), for comparison.
func BenchmarkPeerCredOnly(b *testing.B) {
	dir, err := os.MkdirTemp("", "meshid-attest-")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	lis, err := net.Listen("unix", filepath.Join(dir, "s"))
	if err != nil {
		b.Fatal(err)
	}
	defer lis.Close()
	for b.Loop() {
		c, err := net.Dial("unix", lis.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		raw, err := lis.Accept()
		if err != nil {
			b.Fatal(err)
		}
		if _, err := ReadPeerCred(raw); err != nil {
			b.Fatal(err)
		}
		raw.Close()
		c.Close()
	}
}
