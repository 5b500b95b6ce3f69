// Package k8stest runs a real Kubernetes control plane for tests: etcd and
// kube-apiserver v1.37.2 (built by testbed/k8s/build.sh) on loopback ports,
// with RBAC and ServiceAccount admission on and no controller manager,
// scheduler or kubelet. `make test` starts one bed for the whole run through
// the k8sbed command and exports MESHID_K8S_DIR; tests get it with Shared.
package k8stest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// Issuer is the service-account token issuer of the bed, the one a real
// cluster's default is.
const Issuer = "https://kubernetes.default.svc.cluster.local"

// ReadyTimeout is how long Start waits for /readyz by default: a cold start
// under the load of other builds took 9 s, so two minutes only trips on a
// server that will never come up.
const ReadyTimeout = 120 * time.Second

// StateFile is the name of the file in the bed's directory that describes a
// running bed.
const StateFile = "state.json"

// Options configures Start.
type Options struct {
	// BinDir holds kube-apiserver, etcd and kubectl (testbed/k8s/build.sh
	// prints it).
	BinDir string
	// Dir receives the PKI, etcd's data, the logs, kubeconfig and
	// state.json. It is created if missing.
	Dir string
	// Logger gets progress lines; nil discards them.
	Logger *slog.Logger
	// ReadyTimeout bounds the wait for /readyz; 0 means ReadyTimeout.
	ReadyTimeout time.Duration
	// KillWithParent makes the kernel SIGKILL the children when the
	// process that called Start dies (tests starting their own bed). The
	// k8sbed command leaves it off, so the bed outlives `up`.
	KillWithParent bool
}

// State describes a running bed; Start writes it to Dir/state.json.
type State struct {
	Dir        string    `json:"dir"`
	BinDir     string    `json:"bin_dir"`
	APIServer  string    `json:"apiserver_url"`
	Etcd       string    `json:"etcd_url"`
	Kubeconfig string    `json:"kubeconfig"`
	Kubectl    string    `json:"kubectl"`
	CAFile     string    `json:"ca_file"`
	Issuer     string    `json:"service_account_issuer"`
	Processes  []Process `json:"processes"` // in stop order: kube-apiserver, then etcd
	Started    time.Time `json:"started"`
}

// Instance is a bed started by this process.
type Instance struct {
	State
	log    *slog.Logger
	reaped map[int]chan struct{} // closed when cmd.Wait of that pid returned
}

// Start brings up etcd and kube-apiserver under opts.Dir and returns once
// the API server's /readyz answers 200 and the admin kubeconfig works. On
// error whatever was started is stopped again.
func Start(ctx context.Context, opts Options) (inst *Instance, err error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if opts.BinDir == "" || opts.Dir == "" {
		return nil, errors.New("k8stest: BinDir and Dir are required")
	}
	// kubectl is only recorded: Start does not need it, tests that do fail
	// on their own when it is missing.
	for _, b := range []string{"kube-apiserver", "etcd"} {
		if _, err := os.Stat(filepath.Join(opts.BinDir, b)); err != nil {
			return nil, fmt.Errorf("k8stest: %s missing in %s (run testbed/k8s/build.sh): %w", b, opts.BinDir, err)
		}
	}
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("k8stest: dir: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("k8stest: dir: %w", err)
	}
	if _, err := os.Stat(filepath.Join(dir, StateFile)); err == nil {
		return nil, fmt.Errorf("k8stest: %s already holds a bed (%s); stop it first (k8sbed down --dir %s)", dir, StateFile, dir)
	}
	timeout := opts.ReadyTimeout
	if timeout == 0 {
		timeout = ReadyTimeout
	}
	begun := time.Now()

	p, err := makePKI(filepath.Join(dir, "pki"))
	if err != nil {
		return nil, fmt.Errorf("k8stest: %w", err)
	}
	ports, err := freePorts(3)
	if err != nil {
		return nil, fmt.Errorf("k8stest: %w", err)
	}
	etcdURL := "http://127.0.0.1:" + strconv.Itoa(ports[0])
	peerURL := "http://127.0.0.1:" + strconv.Itoa(ports[1])
	apiURL := "https://127.0.0.1:" + strconv.Itoa(ports[2])

	inst = &Instance{
		State: State{
			Dir:        dir,
			BinDir:     opts.BinDir,
			APIServer:  apiURL,
			Etcd:       etcdURL,
			Kubeconfig: filepath.Join(dir, "kubeconfig"),
			Kubectl:    filepath.Join(opts.BinDir, "kubectl"),
			CAFile:     p.CAFile,
			Issuer:     Issuer,
			Started:    begun,
		},
		log:    log,
		reaped: map[int]chan struct{}{},
	}
	defer func() {
		if err != nil {
			_ = inst.Stop(context.Background())
		}
	}()

	etcd, err := inst.spawn(opts, "etcd",
		"--name=k8sbed",
		"--data-dir="+filepath.Join(dir, "etcd"),
		"--listen-client-urls="+etcdURL,
		"--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+peerURL,
		"--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=k8sbed="+peerURL,
		// The data is thrown away with the bed; fsync only costs time
		// on a loaded machine.
		"--unsafe-no-fsync",
		"--log-level=warn",
	)
	if err != nil {
		return inst, err
	}
	if err := waitHTTP(ctx, timeout, http.DefaultClient, etcdURL+"/health", etcd, inst.reaped[etcd.PID]); err != nil {
		return inst, fmt.Errorf("k8stest: etcd not healthy (log %s): %w", etcd.Log, err)
	}

	api, err := inst.spawn(opts, "kube-apiserver",
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port="+strconv.Itoa(ports[2]),
		"--etcd-servers="+etcdURL,
		"--tls-cert-file="+p.ServingCert,
		"--tls-private-key-file="+p.ServingKey,
		"--client-ca-file="+p.CAFile,
		"--service-account-issuer="+Issuer,
		"--service-account-key-file="+p.SAPub,
		"--service-account-signing-key-file="+p.SAKey,
		"--service-cluster-ip-range=10.96.0.0/16",
		"--authorization-mode=RBAC",
		// The default reconciler refuses a loopback advertise address;
		// the kubernetes Service then has no endpoints, which no test needs.
		"--endpoint-reconciler-type=none",
		"--allow-privileged=true",
		"--profiling=false",
		"--cert-dir="+filepath.Join(dir, "pki", "generated"),
		"--runtime-config=certificates.k8s.io/v1beta1=true",
	)
	if err != nil {
		return inst, err
	}
	tlsClient, err := adminHTTPClient(p.CAPEM, p.AdminCertPEM, p.AdminKeyPEM)
	if err != nil {
		return inst, fmt.Errorf("k8stest: %w", err)
	}
	if err := waitHTTP(ctx, timeout, tlsClient, apiURL+"/readyz", api, inst.reaped[api.PID]); err != nil {
		return inst, fmt.Errorf("k8stest: kube-apiserver not ready (log %s): %w", api.Log, err)
	}

	if err := writeKubeconfig(inst.Kubeconfig, apiURL, p); err != nil {
		return inst, fmt.Errorf("k8stest: %w", err)
	}
	// kube-controller-manager would create every namespace's "default"
	// ServiceAccount; for the default namespace the bed does it, so
	// kubectl-driven pods there are admitted.
	if err := ensureDefaultSA(ctx, inst.Kubeconfig, "default"); err != nil {
		return inst, fmt.Errorf("k8stest: %w", err)
	}
	if err := inst.writeState(); err != nil {
		return inst, fmt.Errorf("k8stest: %w", err)
	}
	log.Info("kubernetes test bed ready", "apiserver", apiURL, "dir", dir, "took", time.Since(begun).Round(time.Millisecond))
	return inst, nil
}

// spawn starts one binary of the bed in its own process group (so a ^C to
// `make test` reaches the trap that stops the bed, not the bed), logging to
// Dir/NAME.log, and records it in inst.Processes.
func (inst *Instance) spawn(opts Options, name string, args ...string) (Process, error) {
	exe := filepath.Join(opts.BinDir, name)
	logPath := filepath.Join(inst.Dir, name+".log")
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return Process{}, fmt.Errorf("k8stest: %s log: %w", name, err)
	}
	defer lf.Close() // the child has its own copy of the descriptor
	cmd := exec.Command(exe, args...)
	cmd.Dir = inst.Dir
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if opts.KillWithParent {
		cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	}
	if err := cmd.Start(); err != nil {
		return Process{}, fmt.Errorf("k8stest: start %s: %w", name, err)
	}
	pid := cmd.Process.Pid
	st, err := StartTime(pid)
	if err != nil {
		// It died already; still record it so the caller's wait sees it.
		st = 0
	}
	pr := Process{Name: name, PID: pid, StartTime: st, Exe: exe, Log: logPath}
	done := make(chan struct{})
	inst.reaped[pid] = done
	// The waiter is owned by the Instance: it ends when the child exits,
	// which Stop (or the kernel, with KillWithParent) brings about.
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	// Stop order is the reverse of start: the API server before etcd.
	inst.Processes = append([]Process{pr}, inst.Processes...)
	inst.log.Info("started", "name", name, "pid", pid, "log", logPath)
	return pr, nil
}

// Stop stops the bed's processes (kube-apiserver first, then etcd), each
// with SIGTERM and, after 20 s, SIGKILL, and removes state.json. The data
// directory is kept for its logs.
func (inst *Instance) Stop(ctx context.Context) error {
	err := stopProcesses(ctx, inst.Processes, inst.reaped)
	if err == nil {
		if rerr := os.Remove(filepath.Join(inst.Dir, StateFile)); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			err = fmt.Errorf("k8stest: %w", rerr)
		}
	}
	return err
}

// StopGrace is how long a bed process gets between SIGTERM and SIGKILL.
// kube-apiserver's graceful shutdown takes about 5 s.
const StopGrace = 20 * time.Second

func stopProcesses(ctx context.Context, procs []Process, reaped map[int]chan struct{}) error {
	var errs []error
	for _, p := range procs {
		var ch <-chan struct{}
		if c, ok := reaped[p.PID]; ok {
			ch = c
		}
		if err := p.stop(ctx, StopGrace, ch); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Stop stops the bed whose state.json is in dir (one started by another
// process, such as `k8sbed up`) and removes the state file. A pid in it that
// now names a different process (its start time differs) is not signalled.
// A dir without a state file is not an error: there is nothing to stop.
func Stop(ctx context.Context, dir string) error {
	st, err := LoadState(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if err := stopProcesses(ctx, st.Processes, nil); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(dir, StateFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("k8stest: %w", err)
	}
	return nil
}

// LoadState reads dir/state.json.
func LoadState(dir string) (*State, error) {
	b, err := os.ReadFile(filepath.Join(dir, StateFile))
	if err != nil {
		return nil, fmt.Errorf("k8stest: %w", err)
	}
	var st State
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("k8stest: %s: %w", filepath.Join(dir, StateFile), err)
	}
	return &st, nil
}

// WriteState writes st to st.Dir/state.json atomically.
func WriteState(st *State) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(st.Dir, StateFile+".tmp")
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(st.Dir, StateFile))
}

func (inst *Instance) writeState() error { return WriteState(&inst.State) }

// freePorts returns n distinct loopback ports that were free a moment ago.
// All listeners are held until every port is picked so the kernel cannot
// hand the same one out twice.
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// waitHTTP polls url until it answers 200, the process exits, or timeout.
func waitHTTP(ctx context.Context, timeout time.Duration, c *http.Client, url string, p Process, exited <-chan struct{}) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		resp, err := c.Do(req)
		if err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Errorf("%s: %s: %.300s", url, resp.Status, body)
		} else {
			last = err
		}
		select {
		case <-exited:
			return fmt.Errorf("%s (pid %d) exited", p.Name, p.PID)
		case <-ctx.Done():
			return fmt.Errorf("no 200 from %s within %s: %w", url, timeout, last)
		case <-tick.C:
		}
	}
}

func adminHTTPClient(caPEM, certPEM, keyPEM []byte) (*http.Client, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, errors.New("bed CA: no certificate")
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("admin key pair: %w", err)
	}
	return &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{
			RootCAs:      pool,
			Certificates: []tls.Certificate{cert},
			MinVersion:   tls.VersionTLS12,
		}},
	}, nil
}

func writeKubeconfig(path, apiURL string, p *pki) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["k8sbed"] = &clientcmdapi.Cluster{Server: apiURL, CertificateAuthorityData: p.CAPEM}
	cfg.AuthInfos["admin"] = &clientcmdapi.AuthInfo{ClientCertificateData: p.AdminCertPEM, ClientKeyData: p.AdminKeyPEM}
	cfg.Contexts["k8sbed"] = &clientcmdapi.Context{Cluster: "k8sbed", AuthInfo: "admin", Namespace: "default"}
	cfg.CurrentContext = "k8sbed"
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	return os.Chmod(path, 0o600)
}

func ensureDefaultSA(ctx context.Context, kubeconfig, ns string) error {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return fmt.Errorf("kubeconfig: %w", err)
	}
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("client: %w", err)
	}
	_, err = c.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
	}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create %s/default service account: %w", ns, err)
	}
	return nil
}
