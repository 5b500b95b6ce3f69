package image_test

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// dockerignore compiles .dockerignore the way the Docker builder reads
// it, for the forms the file uses: one pattern a line, # comments, paths
// relative to the context root, * and ? within one path element, **
// across any number of them; a pattern that matches a directory excludes
// everything under it. "!" exceptions are refused, so a new one makes this
// test grow with it rather than silently misread it.
func dockerignore(t *testing.T) []*regexp.Regexp {
	t.Helper()
	f, err := os.Open(filepath.Join(root, ".dockerignore"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var res []*regexp.Regexp
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		p := strings.TrimSpace(sc.Text())
		if p == "" || strings.HasPrefix(p, "#") {
			continue
		}
		if strings.HasPrefix(p, "!") {
			t.Fatalf(".dockerignore exception %q: teach this test about exceptions", p)
		}
		p = filepath.ToSlash(filepath.Clean(strings.TrimPrefix(p, "/")))
		var b strings.Builder
		for i := 0; i < len(p); i++ {
			switch {
			case strings.HasPrefix(p[i:], "**/"):
				b.WriteString(`(?:.*/)?`)
				i += 2
			case strings.HasPrefix(p[i:], "**"):
				b.WriteString(`.*`)
				i++
			case p[i] == '*':
				b.WriteString(`[^/]*`)
			case p[i] == '?':
				b.WriteString(`[^/]`)
			default:
				b.WriteString(regexp.QuoteMeta(p[i : i+1]))
			}
		}
		res = append(res, regexp.MustCompile(`^`+b.String()+`(?:/.*)?$`))
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return res
}

func excluded(res []*regexp.Regexp, rel string) bool {
	for _, re := range res {
		if re.MatchString(rel) {
			return true
		}
	}
	return false
}

// The Docker build context keeps every file `go build ./cmd/meshid` reads:
// go.mod, go.sum and each Go (and embedded) file of every package of this
// module that the binary imports. .dockerignore keeps the context small
// (no .git, no bed, no docs), and this is what stops it from dropping a
// package the binary needs.
func TestDockerContextHoldsTheBuild(t *testing.T) {
	res := dockerignore(t)
	// The check is live: the ignore file drops what it should.
	for _, rel := range []string{".git/HEAD", "bin/meshid", "README.md", "deploy/kubernetes/base/server.yaml", "agent/x_test.test"} {
		if !excluded(res, rel) {
			t.Errorf(".dockerignore keeps %s", rel)
		}
	}
	for _, rel := range []string{"go.mod", "go.sum", "Dockerfile"} {
		if excluded(res, rel) {
			t.Errorf(".dockerignore drops %s, which the build needs", rel)
		}
	}
	abs, err := filepath.Abs(root)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("go", "list", "-deps", "-f", `{{if and (not .Standard) .Module}}{{if .Module.Main}}{{.Dir}}{{range .GoFiles}} {{.}}{{end}}{{range .EmbedFiles}} {{.}}{{end}}{{end}}{{end}}`, "./cmd/meshid")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	var n int
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		dir, err := filepath.Rel(abs, f[0])
		if err != nil || strings.HasPrefix(dir, "..") {
			t.Fatalf("package dir %s outside the repository", f[0])
		}
		for _, name := range f[1:] {
			n++
			if rel := filepath.ToSlash(filepath.Join(dir, name)); excluded(res, rel) {
				t.Errorf(".dockerignore drops %s, which go build ./cmd/meshid compiles", rel)
			}
		}
	}
	if n == 0 {
		t.Fatalf("go list found no files of this module:\n%s", out)
	}
}
