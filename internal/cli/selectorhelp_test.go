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
// the built-in attestors produce is listed under its attestor, and every
// other kind listed is one the server refuses, naming the attestor the help
// puts it under.
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
	if len(section) == 0 {
		t.Fatal("no kinds listed beyond the built-in ones; the k8s ones are gone from the help")
	}
	for kind, h := range section {
		attestor, _, _ := strings.Cut(h, " (")
		_, err := parseSelector(kind + ":x:y")
		if err == nil || !strings.Contains(err.Error(), "produced by the "+attestor+", which this server does not run") {
			t.Errorf("%s, listed under %q: %v; want it refused naming the %s", kind, h, err, attestor)
		}
	}
}
