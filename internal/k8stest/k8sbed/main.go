// Command k8sbed starts and stops the Kubernetes test bed (etcd and
// kube-apiserver, see package k8stest) outside a test binary, so one bed
// serves a whole `go test ./...` run:
//
//	k8sbed up --bin DIR --dir DIR   # prints: export MESHID_K8S_DIR=DIR
//	k8sbed down --dir DIR
//
// `up` returns once the API server is ready and leaves the two processes
// running in their own process group; `down` stops exactly the processes
// recorded in DIR/state.json.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/meshid/meshid/internal/k8stest"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	dir := fs.String("dir", "", "the bed's directory (PKI, etcd data, logs, kubeconfig, state.json)")
	switch os.Args[1] {
	case "up":
		bin := fs.String("bin", "", "directory holding kube-apiserver, etcd and kubectl (testbed/k8s/build.sh prints it)")
		_ = fs.Parse(os.Args[2:])
		if *bin == "" || *dir == "" {
			fail("up needs --bin and --dir")
		}
		abs, err := filepath.Abs(*dir)
		if err != nil {
			fail(err.Error())
		}
		if _, err := k8stest.Start(ctx, k8stest.Options{BinDir: *bin, Dir: abs, Logger: log}); err != nil {
			// Start has stopped whatever it had started.
			fail(err.Error())
		}
		fmt.Printf("export %s=%s\n", k8stest.EnvDir, abs)
	case "down":
		_ = fs.Parse(os.Args[2:])
		if *dir == "" {
			fail("down needs --dir")
		}
		if err := k8stest.Stop(ctx, *dir); err != nil {
			fail(err.Error())
		}
	default:
		usage()
	}
}

func usage() {
	fail("usage: k8sbed up --bin DIR --dir DIR | k8sbed down --dir DIR")
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, "k8sbed:", msg)
	os.Exit(1)
}
