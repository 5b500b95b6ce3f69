package podattest

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meshid/meshid/attest"
)

const (
	cidA = "8c0b3f9d2e6a4d1f8b7c5e3a1d9f7b5c3e1a9d7f5b3c1e9a7d5f3b1c9e7a5d3f"
	cidB = "1f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c5b6a7988"
	uidP = "2c48913c-b29f-11e7-9350-020968147796"
	uidU = "2c48913c_b29f_11e7_9350_020968147796" // as the systemd driver spells it
)

// Real lines from containerd, CRI-O and docker under both kubelet cgroup
// drivers, cgroup v1, v2 and hybrid.
func TestParseCgroup(t *testing.T) {
	for _, tt := range []struct {
		name    string
		file    string
		inPod   bool
		cid     string
		podUID  string
		wantErr string
	}{
		{name: "containerd, systemd driver, cgroup v2",
			file:  "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidU + ".slice/cri-containerd-" + cidA + ".scope\n",
			inPod: true, cid: cidA, podUID: uidP},
		{name: "containerd, cgroupfs driver, cgroup v1",
			file: "12:memory:/kubepods/burstable/pod" + uidP + "/" + cidA + "\n" +
				"11:cpu,cpuacct:/kubepods/burstable/pod" + uidP + "/" + cidA + "\n" +
				"3:pids:/kubepods/burstable/pod" + uidP + "/" + cidA + "\n" +
				"1:name=systemd:/kubepods/burstable/pod" + uidP + "/" + cidA + "\n",
			inPod: true, cid: cidA, podUID: uidP},
		{name: "guaranteed pod, cgroupfs driver",
			file:  "0::/kubepods/pod" + uidP + "/" + cidA + "\n",
			inPod: true, cid: cidA, podUID: uidP},
		{name: "guaranteed pod, systemd driver",
			file:  "0::/kubepods.slice/kubepods-pod" + uidU + ".slice/cri-containerd-" + cidA + ".scope\n",
			inPod: true, cid: cidA, podUID: uidP},
		{name: "CRI-O, systemd driver, cgroup v1",
			file: "11:devices:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + uidU + ".slice/crio-" + cidA + ".scope\n" +
				"1:name=systemd:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + uidU + ".slice/crio-" + cidA + ".scope\n",
			inPod: true, cid: cidA, podUID: uidP},
		{name: "CRI-O, cgroupfs driver",
			file:  "0::/kubepods/besteffort/pod" + uidP + "/crio-" + cidA + "\n",
			inPod: true, cid: cidA, podUID: uidP},
		{name: "CRI-O's monitor is no container",
			file:  "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + uidU + ".slice/crio-conmon-" + cidA + ".scope\n",
			inPod: true},
		{name: "docker (cri-dockerd), systemd driver",
			file:  "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidU + ".slice/docker-" + cidA + ".scope\n",
			inPod: true, cid: cidA, podUID: uidP},
		{name: "docker, cgroupfs driver, cgroup v1",
			file:  "4:memory:/kubepods/besteffort/pod" + uidP + "/" + cidA + "\n",
			inPod: true, cid: cidA, podUID: uidP},
		{name: "seen from the agent's own cgroup namespace",
			file:  "0::/../../kubepods-besteffort.slice/kubepods-besteffort-pod" + uidU + ".slice/cri-containerd-" + cidA + ".scope\n",
			inPod: true, cid: cidA, podUID: uidP},
		{name: "kind node on cgroup v1: the node's container above is not the pod's",
			file:  "7:memory:/docker/" + cidB + "/kubepods/besteffort/pod" + uidP + "/" + cidA + "\n",
			inPod: true, cid: cidA, podUID: uidP},
		{name: "kind on cgroup v2, systemd driver",
			file:  "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod" + uidU + ".slice/cri-containerd-" + cidA + ".scope\n",
			inPod: true, cid: cidA, podUID: uidP},
		{name: "a cgroup the container made below its own cannot pass for another container",
			file:  "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidU + ".slice/cri-containerd-" + cidA + ".scope/kubepods/pod" + uidP + "/" + cidB + "\n",
			inPod: true, cid: cidA, podUID: uidP},
		{name: "hybrid: v1 controllers at the root, the container in v2",
			file: "9:name=systemd:/\n8:pids:/\n4:memory:/\n" +
				"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidU + ".slice/cri-containerd-" + cidA + ".scope\n",
			inPod: true, cid: cidA, podUID: uidP},
		{name: "a host process", file: "0::/system.slice/sshd.service\n"},
		{name: "a user session, cgroup v1", file: "12:memory:/user.slice/user-1000.slice/session-3.scope\n1:name=systemd:/user.slice/user-1000.slice/session-3.scope\n"},
		{name: "docker outside Kubernetes is no pod", file: "0::/system.slice/docker-" + cidA + ".scope\n"},
		{name: "the kubelet's pod slice itself", file: "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidU + ".slice\n", inPod: true},
		{name: "a short id is no container", file: "0::/kubepods/besteffort/pod" + uidP + "/" + cidA[:63] + "\n", inPod: true},
		{name: "upper-case hex is no container", file: "0::/kubepods/besteffort/pod" + uidP + "/" + strings.ToUpper(cidA) + "\n", inPod: true},
		{name: "no trailing newline", file: "0::/kubepods/besteffort/pod" + uidP + "/" + cidA, inPod: true, cid: cidA, podUID: uidP},
		{name: "empty", file: ""},
		{name: "hierarchies naming two containers",
			file:    "4:memory:/kubepods/besteffort/pod" + uidP + "/" + cidA + "\n0::/kubepods/besteffort/pod" + uidP + "/" + cidB + "\n",
			wantErr: "disagree"},
		{name: "malformed", file: "garbage\n", wantErr: "malformed cgroup line"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseCgroup([]byte(tt.file))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("got %+v, %v; want an error saying %q", got, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.InPod != tt.inPod || got.ContainerID != tt.cid || got.PodUID != tt.podUID {
				t.Fatalf("got in pod %v, container %q, pod %q; want %v, %q, %q", got.InPod, got.ContainerID, got.PodUID, tt.inPod, tt.cid, tt.podUID)
			}
		})
	}
}

// The file is another user's: it is read by the pid only, bounded, and a
// pid that has gone is ErrProcessGone, not "outside any pod".
func TestReadCgroupBounded(t *testing.T) {
	root := t.TempDir()
	write := func(pid, content string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Join(root, pid), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, pid, "cgroup"), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	line := "0::/kubepods/besteffort/pod" + uidP + "/" + cidA + "\n"
	write("10", line)
	if b, err := readCgroup(root, 10); err != nil || string(b) != line {
		t.Fatalf("read %q, %v", b, err)
	}
	// Just under the bound is read whole; over it is refused.
	write("11", strings.Repeat("x", maxCgroupFile))
	if b, err := readCgroup(root, 11); err != nil || len(b) != maxCgroupFile {
		t.Fatalf("a file of exactly the bound: %d bytes, %v", len(b), err)
	}
	write("12", strings.Repeat("x", maxCgroupFile+1))
	if _, err := readCgroup(root, 12); err == nil || !strings.Contains(err.Error(), "over 65536 bytes") {
		t.Fatalf("a file over the bound: %v", err)
	}
	if _, err := readCgroup(root, 13); !errors.Is(err, attest.ErrProcessGone) {
		t.Fatalf("no such pid: %v, want ErrProcessGone", err)
	}
	// A symlink planted where the file should be is not followed.
	if err := os.MkdirAll(filepath.Join(root, "14"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(root, "10", "cgroup"), filepath.Join(root, "14", "cgroup")); err != nil {
		t.Fatal(err)
	}
	if _, err := readCgroup(root, 14); err == nil {
		t.Fatal("a symlinked cgroup file was followed")
	}
}

func TestContainerIDOfStatus(t *testing.T) {
	for in, want := range map[string]string{
		"containerd://" + cidA: cidA, "cri-o://" + cidA: cidA, "docker://" + cidA: cidA,
		cidA: "", "containerd://": "", "containerd://" + cidA[:12]: "", "://" + cidA: "", "containerd:" + cidA: "",
	} {
		if got, _ := containerIDOfStatus(in); got != want {
			t.Errorf("%q: %q, want %q", in, got, want)
		}
	}
}
