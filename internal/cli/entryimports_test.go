package cli

import (
	"go/parser"
	"go/token"
	"strconv"
	"testing"
)

// The entry commands parse and check selectors with package entry, as the
// node agent will: they need neither the store nor the server.
func TestEntryCommandsNeedNoServer(t *testing.T) {
	f, err := parser.ParseFile(token.NewFileSet(), "entry.go", nil, parser.ImportsOnly)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, imp := range f.Imports {
		switch path, _ := strconv.Unquote(imp.Path.Value); path {
		case "github.com/meshid/meshid/controlplane", "github.com/meshid/meshid/store":
			t.Errorf("entry.go imports %s", path)
		case "github.com/meshid/meshid/entry":
			found = true
		}
	}
	if !found {
		t.Error("entry.go does not use package entry")
	}
}
