package podattest

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/meshid/meshid/attest"
)

// maxCgroupFile bounds the read of /proc/<pid>/cgroup: the file belongs to
// another user's process, and a real one is a few hundred bytes even with
// every cgroup v1 controller listed.
const maxCgroupFile = 64 << 10

// cgroupInfo is what a process's cgroup says about the pod it runs in.
type cgroupInfo struct {
	// InPod is set when the path runs through the kubelet's kubepods
	// hierarchy (cgroupfs or systemd driver).
	InPod bool
	// ContainerID is the container's ID, 64 lowercase hex digits: the first
	// container-like component below kubepods, so a container that can
	// make cgroups of its own cannot pass for another one nested below it.
	ContainerID string
	// PodUID is the pod's UID when the path names it (pod<uid> with the
	// cgroupfs driver, kubepods-<qos>-pod<uid_with_underscores>.slice with
	// systemd), in the API server's form (dashes).
	PodUID string
	// Path is the cgroup path the ID was taken from, for messages.
	Path string
}

// readCgroup reads root/<pid>/cgroup, by the pid only: whether that is
// still the caller's process is what Set.Caller checks afterwards. A pid
// that no longer exists is ErrProcessGone.
func readCgroup(root string, pid int) ([]byte, error) {
	path := filepath.Join(root, strconv.Itoa(pid), "cgroup")
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) {
			return nil, fmt.Errorf("pid %d: %w: %s: %v", pid, attest.ErrProcessGone, path, err)
		}
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(fd)
	bp := bufs.Get().(*[maxCgroupFile + 1]byte)
	defer bufs.Put(bp)
	buf := bp[:]
	n := 0
	for n < len(buf) {
		m, err := unix.Read(fd, buf[n:])
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			if errors.Is(err, unix.ESRCH) {
				return nil, fmt.Errorf("pid %d: %w: %s: %v", pid, attest.ErrProcessGone, path, err)
			}
			return nil, &os.PathError{Op: "read", Path: path, Err: err}
		}
		if m == 0 {
			return slices.Clone(buf[:n]), nil
		}
		n += m
	}
	return nil, fmt.Errorf("%s: over %d bytes", path, maxCgroupFile)
}

// bufs are read buffers one byte over the bound, so a file over it is
// told from one that fills it.
var bufs = sync.Pool{New: func() any { return new([maxCgroupFile + 1]byte) }}

// parseCgroup reads a /proc/<pid>/cgroup file, cgroup v1 ("N:controllers:
// path" per hierarchy), v2 ("0::path") or both. Every line that names a
// container must name the same one: two would mean a hierarchy we do not
// understand, and neither is trusted. Lines that name none (a v1
// controller left at the root, the name=systemd line) are ignored.
func parseCgroup(b []byte) (cgroupInfo, error) {
	var got cgroupInfo
	for line := range strings.Lines(string(b)) {
		line = strings.TrimRight(line, "\n")
		if line == "" {
			continue
		}
		_, rest, ok1 := strings.Cut(line, ":")
		_, path, ok2 := strings.Cut(rest, ":")
		if !ok1 || !ok2 {
			return cgroupInfo{}, fmt.Errorf("malformed cgroup line %q", truncate(line))
		}
		info := parseCgroupPath(path)
		switch {
		case info.ContainerID == "":
			got.InPod = got.InPod || info.InPod
		case got.ContainerID == "":
			info.InPod = info.InPod || got.InPod
			got = info
		case got.ContainerID != info.ContainerID || got.PodUID != info.PodUID || got.InPod != info.InPod:
			return cgroupInfo{}, fmt.Errorf("cgroup hierarchies disagree: %q and %q", truncate(got.Path), truncate(path))
		}
	}
	return got, nil
}

// parseCgroupPath finds the pod and container in one cgroup path:
//
//	/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/cri-containerd-<id>.scope
//	/kubepods/burstable/pod<uid>/<id>                    (cgroupfs driver)
//	/kubepods.slice/kubepods-pod<uid_>.slice/crio-<id>.scope
//	/kubepods/besteffort/pod<uid>/crio-<id>
//	/kubepods.slice/.../docker-<id>.scope                (cri-dockerd)
//	/../../kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope
//	                                                     (seen from the agent's own cgroup namespace)
//	/docker/<node>/kubepods/besteffort/pod<uid>/<id>    (a kind node on cgroup v1)
//
// The first component holding "kubepods" starts the pod part; the pod UID
// and the container are looked for only after it, and the first container
// component wins, so neither the node's own container above (kind) nor a
// cgroup a container made below its own can stand in.
func parseCgroupPath(path string) cgroupInfo {
	info := cgroupInfo{Path: path}
	for seg := range strings.SplitSeq(path, "/") {
		if !info.InPod {
			info.InPod = strings.Contains(seg, "kubepods")
			if !info.InPod {
				continue
			}
		}
		if uid := podUIDOf(seg); uid != "" {
			info.PodUID = uid
			continue
		}
		if id := containerIDOf(seg); id != "" {
			info.ContainerID = id
			return info
		}
	}
	if !info.InPod {
		return cgroupInfo{Path: path}
	}
	return info
}

// containerIDOf returns the container ID a cgroup component names:
// cri-containerd-<id>.scope, crio-<id>.scope, docker-<id>.scope (systemd
// driver), crio-<id> or a bare <id> (cgroupfs driver). CRI-O's monitor,
// crio-conmon-<id>.scope, is not the container and names none.
func containerIDOf(seg string) string {
	s := strings.TrimSuffix(seg, ".scope")
	for _, prefix := range []string{"cri-containerd-", "crio-", "docker-", "containerd-"} {
		if rest, ok := strings.CutPrefix(s, prefix); ok {
			s = rest
			break
		}
	}
	if isContainerID(s) {
		return s
	}
	return ""
}

// podUIDOf returns the pod UID a cgroup component names: pod<uid>
// (cgroupfs driver) or ...-pod<uid with '_' for '-'>.slice (systemd).
func podUIDOf(seg string) string {
	var uid string
	if s, ok := strings.CutSuffix(seg, ".slice"); ok {
		i := strings.LastIndex(s, "-pod")
		if i < 0 {
			return ""
		}
		uid = strings.ReplaceAll(s[i+len("-pod"):], "_", "-")
	} else if s, ok := strings.CutPrefix(seg, "pod"); ok {
		uid = s
	} else {
		return ""
	}
	if uid == "" || len(uid) > 64 || strings.Trim(uid, "0123456789abcdef-") != "" {
		return ""
	}
	return uid
}

// isContainerID reports whether s is a container ID as containerd, CRI-O
// and docker make them: 64 lowercase hex digits.
func isContainerID(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// truncate keeps a line from another user's file short in messages.
func truncate(s string) string {
	if len(s) > 200 {
		return s[:200] + "..."
	}
	return s
}
