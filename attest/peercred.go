// Package attest answers "who is calling": the kernel-verified credentials
// of a unix-socket peer (UnixCredentials, PeerCred), turned into selectors
// by Attestors. A Set of attestors is both the workload socket's
// authentication (Set.Caller) and the list of selector kinds an entry may
// name (Set.CheckSelector), so an entry keyed on a kind no attestor here
// produces is refused when it is made. The admin API uses the peer
// credentials alone.
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

	"github.com/meshid/meshid/identity"
)

// PeerCred is what the kernel says about the process at the other end of a
// unix socket, captured when it connected (SO_PEERCRED).
type PeerCred struct {
	UID int
	GID int
	PID int
	// proc tracks the process for the connection's life; nil if it could
	// not be (ReadPeerCred alone does not), and then nothing derived from
	// the pid is attested.
	proc *Process
}

// AuthType implements credentials.AuthInfo.
func (PeerCred) AuthType() string { return "peercred" }

// Selectors returns the caller's unix selectors in "type:value" form
// that need no read of /proc: uid and gid, and unix:pid if the process is
// tracked. The Unix attestor adds the executable's, and Set.Caller checks
// the process after reading them; use that to attest.
func (p PeerCred) Selectors() []string {
	out := []string{
		"unix:uid:" + strconv.Itoa(p.UID),
		"unix:gid:" + strconv.Itoa(p.GID),
	}
	if p.proc != nil {
		out = append(out, "unix:pid:"+strconv.Itoa(p.PID))
	}
	return out
}

// Process is the tracked peer process, nil if it is not tracked.
func (p PeerCred) Process() *Process { return p.proc }

// CallerFromContext attests the caller of a gRPC handler served with
// UnixCredentials with the built-in attestors: Builtin().Caller(ctx).
func CallerFromContext(ctx context.Context) (identity.Caller, error) {
	return builtin.Caller(ctx)
}

// String renders the credentials for logs and the audit trail.
func (p PeerCred) String() string {
	return fmt.Sprintf("uid:%d gid:%d pid:%d", p.UID, p.GID, p.PID)
}

// ErrNoPeerCred means the connection is not a unix socket or the kernel
// returned no credentials.
var ErrNoPeerCred = errors.New("caller has no unix peer credentials")

// ReadPeerCred reads SO_PEERCRED from a unix connection. It does not
// track the process (see UnixCredentials), so the result carries no
// pid-derived selectors.
func ReadPeerCred(conn net.Conn) (PeerCred, error) {
	pc, _, _, err := readPeer(conn, false)
	return pc, err
}

// readPeer reads SO_PEERCRED and, if withPidfd, a pidfd for the peer (see
// openPidfd; -1 if the kernel has none), which the caller then owns.
func readPeer(conn net.Conn, withPidfd bool) (pc PeerCred, pidfd int, peerFD bool, err error) {
	pidfd = -1
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return PeerCred{}, -1, false, ErrNoPeerCred
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return PeerCred{}, -1, false, fmt.Errorf("peer credentials: %w", err)
	}
	var cred *unix.Ucred
	var credErr, fdErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if credErr == nil && withPidfd {
			pidfd, peerFD, fdErr = openPidfd(int(fd), int(cred.Pid))
		}
	}); err != nil {
		return PeerCred{}, -1, false, fmt.Errorf("peer credentials: %w", err)
	}
	if credErr != nil {
		return PeerCred{}, -1, false, fmt.Errorf("peer credentials: %w", credErr)
	}
	pc = PeerCred{UID: int(cred.Uid), GID: int(cred.Gid), PID: int(cred.Pid)}
	if fdErr != nil {
		return pc, -1, false, fdErr
	}
	return pc, pidfd, peerFD, nil
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
// server that attach the peer's SO_PEERCRED to every RPC, and track the
// peer process for the connection's life (see Process): a connection whose
// process has already exited is refused. There is no encryption: the
// socket's file permissions are the boundary.
func UnixCredentials() credentials.TransportCredentials {
	return unixCreds{root: "/proc", exe: newExeHasher()}
}

type unixCreds struct {
	root string // procfs
	exe  *exeHasher
}

func (unixCreds) ClientHandshake(_ context.Context, _ string, conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return conn, nil, nil
}

func (c unixCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	pc, pidfd, peerFD, err := readPeer(conn, true)
	if err != nil {
		return nil, nil, err
	}
	proc, err := trackProcess(c.root, pc.PID, pc.UID, pidfd, peerFD, c.exe)
	if err != nil {
		if errors.Is(err, ErrProcessGone) {
			return nil, nil, err
		}
		// Untrackable but alive (e.g. another pid namespace, or a procfs
		// with hidepid): still served on its uid and gid, which come from
		// the kernel and need no re-check, but with no pid-derived
		// selector.
		return conn, pc, nil
	}
	pc.proc = proc
	return &trackedConn{Conn: conn, proc: proc}, pc, nil
}

// trackedConn releases the peer's Process with the connection.
type trackedConn struct {
	net.Conn
	proc *Process
}

func (c *trackedConn) Close() error {
	c.proc.Close()
	return c.Conn.Close()
}

func (unixCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "peercred"}
}

func (c unixCreds) Clone() credentials.TransportCredentials { return c }

func (unixCreds) OverrideServerName(string) error { return nil }
