package envoyconfig

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

var update = flag.Bool("update", false, "rewrite deploy/envoy/*.yaml from the commands in deploy/envoy/README.md")

// readmeCommand is one `meshid envoy bootstrap ... > deploy/envoy/X.yaml`
// recorded in deploy/envoy/README.md.
type readmeCommand struct {
	line string
	args []string // the flags, after "meshid envoy bootstrap"
	file string   // relative to the repository root
}

// readmeCommands extracts the commands, joining "\" continuation lines.
func readmeCommands(t *testing.T, readme string) []readmeCommand {
	t.Helper()
	const prefix = "meshid envoy bootstrap"
	var cmds []readmeCommand
	var cur string
	for line := range strings.SplitSeq(readme, "\n") {
		line = strings.TrimSpace(line)
		if cur == "" && !strings.HasPrefix(line, prefix+" ") {
			continue
		}
		if s, ok := strings.CutSuffix(line, `\`); ok {
			cur += s + " "
			continue
		}
		cur += line
		if strings.ContainsAny(cur, `"'$`+"`") {
			t.Fatalf("README command %q uses quoting or expansion; keep it to plain words", cur)
		}
		f := strings.Fields(strings.TrimPrefix(cur, prefix))
		if len(f) < 2 || f[len(f)-2] != ">" {
			t.Fatalf("README command %q does not end in '> deploy/envoy/FILE.yaml'", cur)
		}
		cmds = append(cmds, readmeCommand{line: cur, args: f[:len(f)-2], file: f[len(f)-1]})
		cur = ""
	}
	return cmds
}

// TestCommittedFilesMatchCommands parses each command recorded in the README
// with the CLI's own flags (AddFlags) and compares the generated bootstrap
// with the committed file, so the examples cannot drift from the generator.
// The commands must give --socket: its default lives in controlplane.
func TestCommittedFilesMatchCommands(t *testing.T) {
	readme, err := os.ReadFile("../deploy/envoy/README.md")
	if err != nil {
		t.Fatal(err)
	}
	cmds := readmeCommands(t, string(readme))
	if len(cmds) < 2 {
		t.Fatalf("want at least 2 `meshid envoy bootstrap ... > deploy/envoy/FILE.yaml` commands in deploy/envoy/README.md, found %d", len(cmds))
	}
	var covered []string
	for _, c := range cmds {
		t.Run(filepath.Base(c.file), func(t *testing.T) {
			if !strings.HasPrefix(c.file, "deploy/envoy/") || !strings.HasSuffix(c.file, ".yaml") {
				t.Fatalf("README command writes %q, want deploy/envoy/*.yaml", c.file)
			}
			path := filepath.Join("..", c.file)
			covered = append(covered, filepath.Clean(path))
			var o Options
			fs := pflag.NewFlagSet("bootstrap", pflag.ContinueOnError)
			fs.SetOutput(&bytes.Buffer{})
			o.AddFlags(fs, "")
			if err := fs.Parse(c.args); err != nil {
				t.Fatalf("%s: %v", c.line, err)
			}
			if fs.NArg() != 0 {
				t.Fatalf("%s: stray arguments %q", c.line, fs.Args())
			}
			out, err := Generate(o)
			if err != nil {
				t.Fatalf("%s: %v", c.line, err)
			}
			if *update {
				if err := os.WriteFile(path, out, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			committed, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test ./envoyconfig -update)", err)
			}
			if !bytes.Equal(committed, out) {
				t.Errorf("%s differs from the output of its README command; run go test ./envoyconfig -update\n--- generated:\n%s", c.file, out)
			}
		})
	}
	files, err := filepath.Glob("../deploy/envoy/*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if !slices.Contains(covered, filepath.Clean(f)) {
			t.Errorf("%s has no command in deploy/envoy/README.md", f)
		}
	}
}

// TestFlags checks the CLI's flag defaults and that bad flag values fail.
func TestFlags(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		want    expect
		wantErr string
	}{
		{name: "defaults", args: []string{"--spiffe-id", "spiffe://cluster.local/ns/a/sa/b"},
			want: expect{nodeID: "b.a", nodeCluster: DefaultNodeCluster, socket: "/default.sock", validation: SecretRootCA,
				listen: DefaultListen, admin: DefaultAdmin, upstreams: map[uint32]string{}}},
		{name: "no admin", args: []string{"--spiffe-id", "spiffe://td/x", "--admin="}, want: expect{admin: "-"}},
		{name: "repeated upstreams keep commas out of it",
			args: []string{"--spiffe-id", "spiffe://td/x", "--upstream", "spiffe://td/a=a:1", "--upstream", "spiffe://td/b=b:2@20000", "--validation", "spiffe"},
			want: expect{validation: SecretAll, upstreams: map[uint32]string{15001: "spiffe://td/a", 20000: "spiffe://td/b"}}},
		{name: "missing spiffe id", args: nil, wantErr: "--spiffe-id is required"},
		{name: "bad upstream", args: []string{"--spiffe-id", "spiffe://td/x", "--upstream", "spiffe://td/a"}, wantErr: "want SPIFFE-ID=host:port"},
		{name: "bad validation", args: []string{"--spiffe-id", "spiffe://td/x", "--validation", "none"}, wantErr: `unknown --validation "none"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var o Options
			fs := pflag.NewFlagSet("bootstrap", pflag.ContinueOnError)
			o.AddFlags(fs, "/default.sock")
			if err := fs.Parse(tt.args); err != nil {
				t.Fatal(err)
			}
			out, err := Generate(o)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			checkSidecar(t, parseAndValidate(t, out), tt.want)
		})
	}
}
