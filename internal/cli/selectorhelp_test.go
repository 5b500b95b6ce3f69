package cli

import (
	"regexp"
	"strings"
	"testing"

	"github.com/meshid/meshid/attest"
)

// listedKind is a selector in the help: type:key:VALUE.
var listedKind = regexp.MustCompile(`(?:^|\s)([a-z0-9]+:[a-z0-9-]+):\S`)

// The --help list of selectors cannot drift from the attestors: every kind
// the built-in attestors produce (the unix attestor's, and the k8s ones the
// agents produce) is listed under its attestor, and nothing else is.
func TestSelectorHelpMatchesAttestors(t *testing.T) {
	section := map[string]string{} // kind -> the attestor heading above it
	heading := ""
	for line := range strings.Lines(selectorHelp) {
		if h, ok := strings.CutPrefix(line, "  "); ok && !strings.HasPrefix(h, " ") {
			heading = strings.TrimSpace(h)
			continue
		}
		for _, m := range listedKind.FindAllStringSubmatch(line, -1) {
			section[m[1]] = heading
		}
	}
	for _, k := range attest.Builtin().Kinds() {
		by, _ := attest.Builtin().Producer(k.String())
		if h, ok := section[k.String()]; !ok || !strings.HasPrefix(h, by+" attestor") {
			t.Errorf("%s (produced by the %s attestor) is listed under %q", k, by, h)
		}
		delete(section, k.String())
	}
	// A kind listed but produced by no attestor of the server's would be
	// one it refuses: it has no place in the help.
	for kind, h := range section {
		t.Errorf("%s is listed under %q, but no attestor of the server produces it", kind, h)
	}
}
