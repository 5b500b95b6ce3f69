package entry

import (
	"go/parser"
	"go/token"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// The package is shared by the CLI and the node agent precisely because it
// needs neither the store nor the server: importing either (or the SVID
// cache) would drag them, and their dependencies, into both.
func TestImportsNoServerParts(t *testing.T) {
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	checked := 0
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		ast, err := parser.ParseFile(token.NewFileSet(), f, nil, parser.ImportsOnly)
		if err != nil {
			t.Fatal(err)
		}
		for _, imp := range ast.Imports {
			path, _ := strconv.Unquote(imp.Path.Value)
			for _, bad := range []string{"/store", "/controlplane", "/svidcache"} {
				if strings.HasPrefix(path, "github.com/meshid/meshid") && strings.Contains(path, bad) {
					t.Errorf("%s imports %s", f, path)
				}
			}
		}
		checked++
	}
	if checked == 0 {
		t.Fatal("no source files found")
	}
}
