// Package image_test checks what the container image relies on: the binary
// `make build` makes runs with no libc and no files at all (an empty
// chroot, as on distroless-static), the Dockerfile builds it the same way,
// and `make image` picks docker or podman or says which is missing. The
// package holds no code.
package image_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

const root = "../.." // the repository, from this package's directory

// buildLikeMake builds ./cmd/meshid into dir with exactly the command `make
// build` runs (from `make -n build`), output path aside; a non-empty cgo
// replaces its leading CGO_ENABLED=0 (the cgo variant). It returns the
// binary's path.
func buildLikeMake(t *testing.T, dir string, cgo string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "make", "-s", "-n", "-C", root, "build").CombinedOutput()
	if err != nil {
		t.Fatalf("make -n build: %v\n%s", err, out)
	}
	cmdline := strings.TrimSpace(string(out))
	for _, want := range []string{"CGO_ENABLED=0 ", " -trimpath ", " -o bin/meshid ./cmd/meshid"} {
		if !strings.Contains(cmdline, want) {
			t.Fatalf("make build no longer runs %q: %s", want, cmdline)
		}
	}
	bin := filepath.Join(dir, "meshid")
	cmdline = strings.Replace(cmdline, " -o bin/meshid ", " -o "+bin+" ", 1)
	if cgo != "" {
		cmdline = strings.Replace(cmdline, "CGO_ENABLED=0 ", cgo+" ", 1)
	}
	cmd := exec.CommandContext(ctx, "sh", "-c", cmdline)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", cmdline, err, out)
	}
	return bin
}

// runInEmptyRoot runs bin --help as the only file of a fresh root
// directory, as uid/gid 65532 (distroless's nonroot), and returns its
// output.
func runInEmptyRoot(t *testing.T, bin string) (string, error) {
	t.Helper()
	jail := t.TempDir()
	b, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(jail, "meshid"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	// The child chroots as root, then becomes 65532 and execs /meshid: the
	// new root (made 0700) must let 65532 look up its entries.
	if err := os.Chmod(jail, 0o755); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(jail)
	if len(ents) != 1 {
		t.Fatalf("jail holds %d entries, want only the binary", len(ents))
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "/meshid", "--help")
	cmd.Dir = "/"
	cmd.Env = []string{} // nothing from the host
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Chroot:     jail,
		Credential: &syscall.Credential{Uid: 65532, Gid: 65532},
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err = cmd.Run()
	return out.String(), err
}

// The static binary runs where nothing else exists: no dynamic loader, no
// libc, no /etc. And the check can fail: the same build with cgo, which
// links libc dynamically, does not start in the same empty root.
func TestStaticBinaryRunsInEmptyChroot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chroot needs root (the tests run as root in CI)")
	}
	dir := t.TempDir()
	bin := buildLikeMake(t, dir, "")
	out, err := runInEmptyRoot(t, bin)
	if err != nil {
		t.Fatalf("make build's binary in an empty chroot: %v\n%s", err, out)
	}
	if !strings.Contains(out, "meshid mints short-lived SPIFFE X.509-SVIDs") || !strings.Contains(out, "Available Commands:") {
		t.Fatalf("make build's binary in an empty chroot printed no help:\n%s", out)
	}

	t.Run("cgo build fails", func(t *testing.T) {
		cc := os.Getenv("CC")
		if cc == "" {
			cc = "cc"
		}
		if _, err := exec.LookPath(cc); err != nil {
			t.Skipf("no C compiler (%s) to build the cgo variant, so the failing half is not shown: %v", cc, err)
		}
		// A small cgo program, not meshid with cgo: a second full build
		// of meshid and its C parts costs minutes of CI, and what is shown
		// is the same: a binary that needs the dynamic loader does not
		// start in the empty root.
		cgoDir := filepath.Join(dir, "cgo")
		if err := os.Mkdir(cgoDir, 0o755); err != nil {
			t.Fatal(err)
		}
		src := "package main\n\n// #include <stdio.h>\n// static void hello(void) { puts(\"Available Commands:\"); fflush(stdout); }\nimport \"C\"\n\nfunc main() { C.hello() }\n"
		for name, body := range map[string]string{"go.mod": "module cgohello\n\ngo 1.26\n", "main.go": src} {
			if err := os.WriteFile(filepath.Join(cgoDir, name), []byte(body), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		cgoBin := filepath.Join(cgoDir, "meshid")
		build := exec.Command("go", "build", "-o", cgoBin, ".")
		build.Dir = cgoDir
		build.Env = append(os.Environ(), "CGO_ENABLED=1", "GOFLAGS=-mod=mod")
		if out, err := build.CombinedOutput(); err != nil {
			t.Fatalf("build the cgo program: %v\n%s", err, out)
		}
		if out, err := exec.Command(cgoBin).CombinedOutput(); err != nil || !strings.Contains(string(out), "Available Commands:") {
			t.Fatalf("the cgo program does not run outside the chroot: %v\n%s", err, out)
		}
		out, err := runInEmptyRoot(t, cgoBin)
		if err == nil {
			t.Fatalf("a cgo build ran in an empty chroot, so the check above proves nothing:\n%s", out)
		}
		// exec of a dynamically linked binary whose loader is missing
		// fails with ENOENT, before any of its code runs.
		if !errors.Is(err, syscall.ENOENT) {
			t.Fatalf("cgo build in an empty chroot: %v, want ENOENT (missing dynamic loader)\n%s", err, out)
		}
	})
}

// The Dockerfile builds the binary as `make build` does (static, trimmed
// paths, version stamps), puts it at /usr/local/bin/meshid as the
// entrypoint and runs as nonroot 65532 on distroless-static.
func TestDockerfileMatchesMakeBuild(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(root, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	df := string(b)
	mk, err := os.ReadFile(filepath.Join(root, "Makefile"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"CGO_ENABLED=0 go build -trimpath",
		"FROM gcr.io/distroless/static-debian12:nonroot",
		"COPY --from=build /out/meshid /usr/local/bin/meshid",
		"USER 65532:65532",
		`ENTRYPOINT ["/usr/local/bin/meshid"]`,
	} {
		if !strings.Contains(df, want) {
			t.Errorf("Dockerfile lacks %q", want)
		}
	}
	// Every -X stamp of the Makefile's LDFLAGS is in the Dockerfile's.
	stamps := regexp.MustCompile(`-X (\S+)=`).FindAllStringSubmatch(string(mk), -1)
	if len(stamps) == 0 {
		t.Fatal("no -X stamps in the Makefile")
	}
	for _, s := range stamps {
		if !strings.Contains(df, "-X "+s[1]+"=") {
			t.Errorf("Dockerfile does not stamp %s as the Makefile does", s[1])
		}
	}
}

// shimPath returns a PATH of one directory holding the tools make image
// needs (make, sh, git) and, if given, a fake container tool.
func shimPath(t *testing.T, tool string) (path, log string) {
	t.Helper()
	dir := t.TempDir()
	for _, name := range []string{"make", "sh", "git"} {
		p, err := exec.LookPath(name)
		if err != nil {
			if name == "git" {
				continue // VERSION falls back to "dev"
			}
			t.Fatal(err)
		}
		if err := os.Symlink(p, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	log = filepath.Join(dir, "calls")
	if tool != "" {
		// The fake records its arguments, one per line.
		script := "#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done > " + log + "\n"
		if err := os.WriteFile(filepath.Join(dir, tool), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir, log
}

func runMakeImage(t *testing.T, path string) (string, error) {
	t.Helper()
	cmd := exec.Command(filepath.Join(path, "make"), "-s", "-C", root, "image")
	cmd.Env = []string{"PATH=" + path, "HOME=" + t.TempDir()}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// make image says which tool is missing, and otherwise calls the one that
// exists (docker first, then podman) to build meshid:dev from the
// Dockerfile at the root.
func TestMakeImage(t *testing.T) {
	if _, err := exec.LookPath("make"); err != nil {
		t.Skip("no make")
	}
	t.Run("neither", func(t *testing.T) {
		path, _ := shimPath(t, "")
		out, err := runMakeImage(t, path)
		if err == nil {
			t.Fatalf("make image succeeded without docker or podman:\n%s", out)
		}
		if !strings.Contains(out, "neither docker nor podman is installed") {
			t.Fatalf("make image without a tool: %v, but not saying which is missing:\n%s", err, out)
		}
	})
	for _, tool := range []string{"docker", "podman"} {
		t.Run(tool, func(t *testing.T) {
			path, log := shimPath(t, tool)
			out, err := runMakeImage(t, path)
			if err != nil {
				t.Fatalf("make image with %s: %v\n%s", tool, err, out)
			}
			calls, err := os.ReadFile(log)
			if err != nil {
				t.Fatalf("make image did not run %s: %v\n%s", tool, err, out)
			}
			args := strings.Split(strings.TrimSpace(string(calls)), "\n")
			want := []string{"build", "-t", "meshid:dev", "."}
			if args[0] != want[0] || !contains(args, "-t", "meshid:dev") || args[len(args)-1] != "." {
				t.Fatalf("make image ran %s %q, want %s %v with build args", tool, args, tool, want)
			}
			if !contains(args, "--build-arg") {
				t.Fatalf("make image passes no --build-arg VERSION: %q", args)
			}
		})
	}
}

// contains reports whether seq appears in args, in order and adjacent.
func contains(args []string, seq ...string) bool {
	for i := 0; i+len(seq) <= len(args); i++ {
		if slices.Equal(args[i:i+len(seq)], seq) {
			return true
		}
	}
	return false
}
