package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"sigs.k8s.io/yaml"

	"github.com/meshid/meshid/endpoint"
	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
)

// adminFlag adds --admin-socket to a client command.
func adminFlag(cmd *cobra.Command, p *string) {
	cmd.Flags().StringVar(p, "admin-socket", endpoint.DefaultLayout().AdminSocket, "admin API socket of the server to talk to")
}

// dialAdmin connects to the admin API. It checks the socket exists first,
// so the common mistake (no server running) gets a clear message instead
// of a gRPC connection error.
func dialAdmin(path string) (adminv1.AdminServiceClient, func(), error) {
	if _, err := os.Stat(path); err != nil {
		return nil, nil, fmt.Errorf("no admin socket at %s: is the server running? (set --admin-socket or MESHID_ADMIN_SOCKET)", path)
	}
	// gRPC reads a relative path in a unix:// target as an authority.
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, nil, fmt.Errorf("admin socket %s: %w", path, err)
	}
	path = abs
	conn, err := grpc.NewClient("unix://"+path,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}))
	if err != nil {
		return nil, nil, fmt.Errorf("admin socket %s: %w", path, err)
	}
	return adminv1.NewAdminServiceClient(conn), func() { conn.Close() }, nil
}

// rpcContext bounds one admin call so a wedged server does not hang a script.
func rpcContext(cmd *cobra.Command) (context.Context, context.CancelFunc) {
	return context.WithTimeout(cmd.Context(), 30*time.Second)
}

var jsonOpts = protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true}

// writeJSONList writes messages as one JSON array, stable for scripts.
func writeJSONList[T proto.Message](w io.Writer, items []T) error {
	raw := make([]json.RawMessage, 0, len(items))
	for _, it := range items {
		b, err := jsonOpts.Marshal(it)
		if err != nil {
			return err
		}
		raw = append(raw, b)
	}
	return writeJSON(w, raw)
}

func writeJSONMessage(w io.Writer, m proto.Message) error {
	b, err := jsonOpts.Marshal(m)
	if err != nil {
		return err
	}
	return writeJSON(w, json.RawMessage(b))
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// writeAs writes what write produces as JSON in format: as is for json,
// converted for yaml, so both formats carry the same fields and names.
func writeAs(w io.Writer, format string, write func(io.Writer) error) error {
	if format != "yaml" {
		return write(w)
	}
	var buf bytes.Buffer
	if err := write(&buf); err != nil {
		return err
	}
	y, err := yaml.JSONToYAML(buf.Bytes())
	if err != nil {
		return fmt.Errorf("convert output to yaml: %w", err)
	}
	_, err = w.Write(y)
	return err
}

// writeOut writes v as a JSON or YAML document (see structured).
func writeOut(w io.Writer, format string, v any) error {
	return writeAs(w, format, func(w io.Writer) error { return writeJSON(w, v) })
}

// writeOutMessage writes m as a JSON or YAML document with proto field names.
func writeOutMessage(w io.Writer, format string, m proto.Message) error {
	return writeAs(w, format, func(w io.Writer) error { return writeJSONMessage(w, m) })
}

// writeOutList writes items as one JSON or YAML list.
func writeOutList[T proto.Message](w io.Writer, format string, items []T) error {
	return writeAs(w, format, func(w io.Writer) error { return writeJSONList(w, items) })
}

// adminCall dials the admin API and makes one call with a bounded context,
// e.g. adminCall(cmd, socket, adminv1.AdminServiceClient.ListCAs, req).
func adminCall[Req, Resp any](cmd *cobra.Command, socket string,
	rpc func(adminv1.AdminServiceClient, context.Context, Req, ...grpc.CallOption) (Resp, error), req Req) (Resp, error) {
	var zero Resp
	c, done, err := dialAdmin(socket)
	if err != nil {
		return zero, err
	}
	defer done()
	ctx, cancel := rpcContext(cmd)
	defer cancel()
	return rpc(c, ctx, req)
}
