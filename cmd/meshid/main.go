// Command meshid is the one meshid binary: the server, the dev mode, and
// the operator's client for the admin API.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/meshid/meshid/internal/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := cli.Main(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
