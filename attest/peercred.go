// Package attest answers "who is calling": the kernel-verified credentials
// of a unix-socket peer, turned into selectors. Both the admin API and the
// workload APIs (SDS, SPIFFE Workload API) use this one path.
package attest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// PeerCred is what the kernel says about the process at the other end of a
// unix socket, captured when it connected (SO_PEERCRED).
type PeerCred struct {
	UID int
	GID int
	PID int
}

// AuthType implements credentials.AuthInfo.
func (PeerCred) AuthType() string { return "peercred" }

// Selectors returns the caller's unix selectors in "type:value" form.
func (p PeerCred) Selectors() []string {
	return []string{
		"unix:uid:" + strconv.Itoa(p.UID),
		"unix:gid:" + strconv.Itoa(p.GID),
		"unix:pid:" + strconv.Itoa(p.PID),
	}
}

// String renders the credentials for logs and the audit trail.
func (p PeerCred) String() string {
	return fmt.Sprintf("uid:%d gid:%d pid:%d", p.UID, p.GID, p.PID)
}

// ErrNoPeerCred means the connection is not a unix socket or the kernel
// returned no credentials.
var ErrNoPeerCred = errors.New("caller has no unix peer credentials")

// ReadPeerCred reads SO_PEERCRED from a unix connection.
func ReadPeerCred(conn net.Conn) (PeerCred, error) {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return PeerCred{}, ErrNoPeerCred
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return PeerCred{}, fmt.Errorf("peer credentials: %w", err)
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return PeerCred{}, fmt.Errorf("peer credentials: %w", err)
	}
	if credErr != nil {
		return PeerCred{}, fmt.Errorf("peer credentials: %w", credErr)
	}
	return PeerCred{UID: int(cred.Uid), GID: int(cred.Gid), PID: int(cred.Pid)}, nil
}

// PeerCredFromContext returns the unix credentials of the caller of a gRPC
// handler served with UnixCredentials.
func PeerCredFromContext(ctx context.Context) (PeerCred, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return PeerCred{}, ErrNoPeerCred
	}
	pc, ok := p.AuthInfo.(PeerCred)
	if !ok {
		return PeerCred{}, ErrNoPeerCred
	}
	return pc, nil
}

// UnixCredentials returns gRPC transport credentials for a unix-socket
// server that attach the peer's SO_PEERCRED to every RPC. There is no
// encryption: the socket's file permissions are the boundary.
func UnixCredentials() credentials.TransportCredentials { return unixCreds{} }

type unixCreds struct{}

func (unixCreds) ClientHandshake(_ context.Context, _ string, conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return conn, nil, nil
}

func (unixCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	pc, err := ReadPeerCred(conn)
	if err != nil {
		return nil, nil, err
	}
	return conn, pc, nil
}

func (unixCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "peercred"}
}

func (c unixCreds) Clone() credentials.TransportCredentials { return c }

func (unixCreds) OverrideServerName(string) error { return nil }
