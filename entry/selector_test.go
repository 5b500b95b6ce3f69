package entry

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshid/meshid/attest"
)

// kinds is what the server passes: the built-in attestors.
var kinds = attest.Builtin()

func TestParse(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want Selector
		err  bool
	}{
		{"unix:uid:1000", Selector{"unix", "uid:1000"}, false},
		{"unix:path:/usr/bin/a:b", Selector{"unix", "path:/usr/bin/a:b"}, false},
		{"k8s:pod-label:app:web", Selector{"k8s", "pod-label:app:web"}, false},
		{"unix:uid", Selector{"unix", "uid"}, false}, // the form is fine; Validate refuses the kind
		{"unix", Selector{}, true},
		{"unix:", Selector{}, true},
		{":uid:1000", Selector{}, true},
		{"", Selector{}, true},
	} {
		got, err := Parse(tt.in)
		if (err != nil) != tt.err || got != tt.want {
			t.Errorf("Parse(%q) = %+v, %v; want %+v, error %v", tt.in, got, err, tt.want, tt.err)
		}
		if err != nil && !strings.Contains(err.Error(), "want type:key:value") {
			t.Errorf("Parse(%q): reason %q does not say the form wanted", tt.in, err)
		}
		if err == nil && got.String() != tt.in {
			t.Errorf("Parse(%q).String() = %q", tt.in, got.String())
		}
	}
}

// A selector is refused for its size, its characters or a kind no attestor
// produces, with a reason naming the limit; the boundaries are exact.
func TestSelectorValidate(t *testing.T) {
	long := func(n int) Selector { // n bytes in all
		return Selector{"unix", "path:/" + strings.Repeat("n", n-len("unix:path:/"))}
	}
	for _, tt := range []struct {
		name string
		sel  Selector
		want string // "" means valid
	}{
		{"uid", Selector{"unix", "uid:1000"}, ""},
		{"path", Selector{"unix", "path:/usr/bin/db"}, ""},
		{"exactly the limit", long(MaxSelectorLen), ""},
		{"one byte over", long(MaxSelectorLen + 1), "257 bytes, more than the 256 allowed"},
		{"control character", Selector{"unix", "path:/usr/bin/shop\x1b[2J"}, `contains the non-printable character U+001B`},
		{"line separator", Selector{"unix", "path:/usr/bin/shop\u2028"}, "non-printable character U+2028"},
		{"invalid utf-8", Selector{"unix", "path:/\xff"}, "is not valid UTF-8"},
		{"kind the agents' k8s attestor produces", Selector{"k8s", "ns:shop"}, ""},
		{"k8s name Kubernetes refuses", Selector{"k8s", "ns:Shop"}, `selector k8s:ns:Shop: "Shop" is not a DNS-1123 label`},
		{"kind of no attestor", Selector{"token", "id:spiffe://cluster.local/agent"}, "token:id is produced by no attestor"},
		{"kind without a value", Selector{"unix", "uid"}, "want unix:uid:"},
		{"uid not a number", Selector{"unix", "uid:root"}, "selector unix:uid:root:"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.sel.Validate(kinds)
			if tt.want == "" {
				if err != nil {
					t.Fatalf("%+v refused: %v", tt.sel, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("%+v: %v, want a reason containing %q", tt.sel, err, tt.want)
			}
			if len(err.Error()) > 300 || strings.ContainsAny(err.Error(), "\x1b\n\u2028") {
				t.Fatalf("reason %q is long or echoes a control character", err)
			}
		})
	}
}

func TestValidateSelectors(t *testing.T) {
	uid := Selector{"unix", "uid:1000"}
	gids := func(n int) []Selector {
		out := make([]Selector, n)
		for i := range out {
			out[i] = Selector{"unix", "gid:" + strconv.Itoa(i)}
		}
		return out
	}
	for _, tt := range []struct {
		name string
		sels []Selector
		want string
	}{
		{"one", []Selector{uid}, ""},
		{"the most allowed", gids(MaxSelectorsPerEntry), ""},
		{"none", nil, "at least one selector is required"},
		{"one too many", gids(MaxSelectorsPerEntry + 1), "65 selectors, more than the 64 allowed per entry"},
		{"pid alone", []Selector{{"unix", "pid:4242"}}, "a unix:pid selector needs a unix:uid selector beside it"},
		{"pid beside a gid", []Selector{{"unix", "pid:4242"}, {"unix", "gid:0"}}, "needs a unix:uid"},
		{"pid beside its uid", []Selector{{"unix", "pid:4242"}, uid}, ""},
		{"one bad among good", []Selector{uid, {"k8s", "sa:db"}, {"k8s", "sa:DB"}}, `selector k8s:sa:DB: "DB" is not a DNS-1123 subdomain`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			err := ValidateSelectors(tt.sels, kinds)
			if tt.want == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
			} else if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("%v, want a reason containing %q", err, tt.want)
			}
		})
	}
}

func TestValidateDNSNamesAndHint(t *testing.T) {
	many := make([]string, MaxDNSNamesPerEntry+1)
	for i := range many {
		many[i] = fmt.Sprintf("h%d.example.com", i)
	}
	for _, tt := range []struct {
		name string
		err  error
		want string
	}{
		{"names", ValidateDNSNames([]string{"web.shop.svc", "*.shop.example.com"}), ""},
		{"the most names", ValidateDNSNames(many[:MaxDNSNamesPerEntry]), ""},
		{"too many names", ValidateDNSNames(many), "33 dns names, more than the 32 allowed"},
		{"ip address", ValidateDNSNames([]string{"10.0.0.1"}), "IP address"},
		{"wildcard over a tld", ValidateDNSNames([]string{"*.com"}), "wildcard"},
		{"hint", ValidateHint("db"), ""},
		{"hint at the limit", ValidateHint(strings.Repeat("h", MaxHintLen)), ""},
		{"hint over", ValidateHint(strings.Repeat("h", MaxHintLen+1)), "hint is 257 bytes, more than the 256 allowed"},
		{"hint with a control character", ValidateHint("x\x1b[2J"), `hint: "x\x1b[2J" contains the non-printable character U+001B`},
	} {
		if tt.want == "" {
			if tt.err != nil {
				t.Errorf("%s: refused: %v", tt.name, tt.err)
			}
		} else if tt.err == nil || !strings.Contains(tt.err.Error(), tt.want) {
			t.Errorf("%s: %v, want a reason containing %q", tt.name, tt.err, tt.want)
		}
	}
}

// Validate normalizes the selectors of a valid entry, calls checkTTL only
// for an explicit TTL, and reports the first failed check.
func TestValidate(t *testing.T) {
	errTTL := errors.New("ttl beyond the CA")
	var asked []time.Duration
	checkTTL := func(d time.Duration) error {
		asked = append(asked, d)
		if d > time.Hour {
			return errTTL
		}
		return nil
	}
	typed := []Selector{{"unix", "uid:1000"}, {"unix", "gid:50"}, {"unix", "uid:1000"}}
	e := Entry{Selectors: typed, TTL: 30 * time.Minute, DNSNames: []string{"web.shop.svc"}, Hint: "web"}
	if err := Validate(&e, kinds, checkTTL); err != nil {
		t.Fatal(err)
	}
	if want := []Selector{{"unix", "gid:50"}, {"unix", "uid:1000"}}; !slices.Equal(e.Selectors, want) {
		t.Fatalf("selectors %v, want %v", e.Selectors, want)
	}
	if typed[0] != (Selector{"unix", "uid:1000"}) || len(typed) != 3 {
		t.Fatalf("the caller's slice was changed: %v", typed)
	}
	if !slices.Equal(asked, []time.Duration{30 * time.Minute}) {
		t.Fatalf("checkTTL asked %v", asked)
	}

	asked = nil
	for _, tt := range []struct {
		name string
		e    Entry
		want string
	}{
		{"ttl the CA refuses", Entry{Selectors: typed, TTL: 2 * time.Hour}, errTTL.Error()},
		{"negative ttl", Entry{Selectors: typed, TTL: -time.Second}, "ttl -1s must not be negative"},
		{"selectors before ttl", Entry{TTL: 2 * time.Hour}, "at least one selector"},
		{"ttl before dns names", Entry{Selectors: typed, TTL: 2 * time.Hour, DNSNames: []string{"10.0.0.1"}}, errTTL.Error()},
		{"dns names before hint", Entry{Selectors: typed, DNSNames: []string{"10.0.0.1"}, Hint: "\x00"}, "IP address"},
		{"hint", Entry{Selectors: typed, Hint: "\x00"}, "hint:"},
	} {
		e := tt.e
		if err := Validate(&e, kinds, checkTTL); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: %v, want a reason containing %q", tt.name, err, tt.want)
		}
	}
	if !slices.Equal(asked, []time.Duration{2 * time.Hour, 2 * time.Hour}) {
		t.Fatalf("checkTTL asked %v, want only the two entries that got that far", asked)
	}
	// Without a CA to ask (an agent), any positive TTL passes.
	e = Entry{Selectors: typed, TTL: 1000 * time.Hour}
	if err := Validate(&e, kinds, nil); err != nil {
		t.Fatal(err)
	}
}

func TestNormalize(t *testing.T) {
	in := []Selector{{"unix", "uid:2"}, {"k8s", "ns:a"}, {"unix", "gid:1"}, {"unix", "uid:2"}, {"k8s", "ns:a"}}
	want := []Selector{{"k8s", "ns:a"}, {"unix", "gid:1"}, {"unix", "uid:2"}}
	if got := Normalize(in); !slices.Equal(got, want) {
		t.Fatalf("Normalize = %v, want %v", got, want)
	}
	if in[0] != (Selector{"unix", "uid:2"}) {
		t.Fatalf("input reordered: %v", in)
	}
	if got := Strings(want); !slices.Equal(got, []string{"k8s:ns:a", "unix:gid:1", "unix:uid:2"}) {
		t.Fatalf("Strings = %v", got)
	}
}

// PIDSelectors pins a live process by pid and owner, a set that passes the
// pid-pinned rule; a pid with no process is an error.
func TestPIDSelectors(t *testing.T) {
	sels, err := PIDSelectors(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	want := []Selector{{"unix", "uid:" + strconv.Itoa(os.Getuid())}, {"unix", "pid:" + strconv.Itoa(os.Getpid())}}
	if !slices.Equal(sels, want) {
		t.Fatalf("PIDSelectors = %v, want %v", sels, want)
	}
	if err := ValidateSelectors(sels, kinds); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile("/proc/sys/kernel/pid_max")
	if err != nil {
		t.Fatal(err)
	}
	pidMax, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := PIDSelectors(pidMax + 1); err == nil || !strings.Contains(err.Error(), "process "+strconv.Itoa(pidMax+1)) {
		t.Fatalf("pid beyond pid_max: %v, want an error naming it", err)
	}
}
