package attest

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/meshid/meshid/identity"
)

// Kind is one kind of selector an attestor produces: the selector
// "unix:uid:1000" is of kind unix:uid.
type Kind struct {
	// Type and Key name the kind ("unix", "uid"); neither holds a colon.
	Type, Key string
	// Value names the form of its values in help text: "N", "/ABS/PATH".
	Value string
	// Check refuses a value the attestor never produces, so that an
	// entry keyed on it, which could never match, is refused when it is
	// made rather than silently never served.
	Check func(value string) error
}

// String renders the kind as type:key.
func (k Kind) String() string { return k.Type + ":" + k.Key }

// Attestor turns a workload-socket caller into selectors. The selector
// kinds an entry may use are the Kinds of the attestors a Set is built
// from, so the list of what entries may name cannot drift from what is
// produced.
type Attestor interface {
	// Name names the attestor in messages ("unix").
	Name() string
	// Kinds lists every kind of selector Attest may return.
	Kinds() []Kind
	// Attest returns the caller's selectors as "type:key:value", each of
	// a kind in Kinds. What it reads by pid may, until the process is
	// checked, describe a process that took the caller's pid; Set.Caller
	// checks it after every attestor has run, so an attestor need not.
	Attest(ctx context.Context, p PeerCred) ([]string, error)
}

// Set is the attestors one program runs: the workload socket's
// authentication and the check of entries' selectors both come from it.
type Set struct {
	attestors []Attestor
	kinds     map[string]producedKind // by "type:key"
	types     map[string][]string     // type -> its keys, sorted
}

type producedKind struct {
	Kind
	by string // the attestor's name
}

// NewSet builds a Set from attestors. Two attestors producing the same
// kind are refused: an entry's selector must have one meaning.
func NewSet(attestors ...Attestor) (*Set, error) {
	s := &Set{attestors: attestors, kinds: map[string]producedKind{}, types: map[string][]string{}}
	for _, a := range attestors {
		for _, k := range a.Kinds() {
			switch {
			case k.Type == "" || k.Key == "" || strings.Contains(k.Type, ":") || strings.Contains(k.Key, ":"):
				return nil, fmt.Errorf("attestor %s: selector kind %q: want a type and a key without colons", a.Name(), k.String())
			case k.Check == nil:
				return nil, fmt.Errorf("attestor %s: selector kind %s has no value check", a.Name(), k)
			}
			if other, ok := s.kinds[k.String()]; ok {
				return nil, fmt.Errorf("selector kind %s is produced by both the %s and the %s attestor", k, other.by, a.Name())
			}
			s.kinds[k.String()] = producedKind{Kind: k, by: a.Name()}
			s.types[k.Type] = append(s.types[k.Type], k.Key)
		}
	}
	for _, keys := range s.types {
		slices.Sort(keys)
	}
	return s, nil
}

// Builtin returns the Set of the attestors built into this program: the
// unix attestor, and the k8s attestor's kinds (K8sDeclared: the server
// stores entries for pods that node agents attest). A Set does not change
// once built, so it is shared.
func Builtin() *Set { return builtin }

var builtin = func() *Set {
	s, err := NewSet(Unix{}, K8sDeclared{})
	if err != nil {
		panic(err) // the built-in kinds are fixed; a clash is a bug the tests catch
	}
	return s
}()

// Kinds returns every kind the Set's attestors produce, sorted.
func (s *Set) Kinds() []Kind {
	out := make([]Kind, 0, len(s.kinds))
	for _, k := range s.kinds {
		out = append(out, k.Kind)
	}
	slices.SortFunc(out, func(a, b Kind) int { return strings.Compare(a.String(), b.String()) })
	return out
}

// Producer returns the name of the attestor that produces kind
// ("unix:uid"), and whether any in the Set does.
func (s *Set) Producer(kind string) (string, bool) {
	k, ok := s.kinds[kind]
	return k.by, ok
}

// CheckSelector checks a selector, given as its type ("unix") and the rest
// ("uid:1000"), against the kinds the Set produces. The error says what is
// wrong without repeating the selector; for a kind that is not produced
// here but known elsewhere (k8s:ns), it names where it comes from.
func (s *Set) CheckSelector(typ, value string) error {
	key, v, hasValue := strings.Cut(value, ":")
	kind := typ + ":" + key
	if k, ok := s.kinds[kind]; ok {
		if !hasValue {
			return fmt.Errorf("want %s:%s", kind, k.Value)
		}
		return k.Check(v)
	}
	if why, ok := elsewhere(kind); ok {
		return fmt.Errorf("selector kind %s %s", kind, why)
	}
	keys, ok := s.types[typ]
	if !ok {
		return fmt.Errorf("unknown selector type %q (known: %s)", typ, strings.Join(s.typeNames(), ", "))
	}
	return fmt.Errorf("unknown %s selector key %q (known: %s)", typ, key, strings.Join(keys, ", "))
}

func (s *Set) typeNames() []string {
	out := make([]string, 0, len(s.types))
	for t := range s.types {
		out = append(out, t)
	}
	slices.Sort(out)
	return out
}

// Caller attests the caller of a gRPC handler served with
// UnixCredentials: the selectors of every attestor in the Set, for the
// peer credentials the connection was accepted with. A tracked process is
// checked after all of them have read what they read by pid: if it has
// exited or its pid was reused meanwhile, the answer is an error wrapping
// ErrProcessGone, never another process's selectors. The Caller's Check
// repeats that check; the APIs call it before every send.
func (s *Set) Caller(ctx context.Context) (identity.Caller, error) {
	pc, err := PeerCredFromContext(ctx)
	if err != nil {
		return identity.Caller{}, err
	}
	c := identity.Caller{Label: pc.String()}
	var checks []func() error
	for _, a := range s.attestors {
		var (
			sels  []string
			check func() error
			err   error
		)
		if r, ok := a.(Rechecker); ok {
			sels, check, err = r.AttestRecheck(ctx, pc)
		} else {
			sels, err = a.Attest(ctx, pc)
		}
		if err != nil {
			return identity.Caller{}, fmt.Errorf("%s attestor: %w", a.Name(), err)
		}
		c.Selectors = append(c.Selectors, sels...)
		if check != nil {
			checks = append(checks, check)
		}
	}
	if pc.proc != nil {
		if err := pc.proc.Check(); err != nil {
			return identity.Caller{}, err
		}
		// The process first: once it is gone, that is the reason.
		checks = append([]func() error{pc.proc.Check}, checks...)
	}
	switch len(checks) {
	case 0:
	case 1:
		c.Check = checks[0]
	default:
		c.Check = func() error {
			for _, f := range checks {
				if err := f(); err != nil {
					return err
				}
			}
			return nil
		}
	}
	return c, nil
}

// Rechecker is an Attestor whose answer can stop holding while the caller
// still runs: a pod deleted, or its container gone from the pod's status.
// Set.Caller uses AttestRecheck instead of Attest and adds check (nil:
// nothing to re-check) to the Caller's Check, which the APIs run before
// every send.
type Rechecker interface {
	Attestor
	AttestRecheck(ctx context.Context, p PeerCred) (selectors []string, check func() error, err error)
}

// notHere lists selector kinds that no attestor built in produces but that
// operators may know from DESIGN or SPIRE: only so that an entry naming
// one is refused with where such selectors come from. A kind in it stops
// being refused the moment an attestor in the Set produces it.
var notHere = []struct {
	kinds []string
	why   string
}{
	{
		// Built in (K8sDeclared) but not in every Set: a Set built
		// without it says where the kinds come from.
		kinds: []string{"k8s:ns", "k8s:sa", "k8s:pod-name", "k8s:pod-uid", "k8s:node-name", "k8s:pod-label", "k8s:container-name", "k8s:container-image"},
		why:   "is produced by the k8s workload attestor (meshid agent on Kubernetes), which this attestor set does not include",
	},
	{
		// Accepted by older versions though nothing ever produced it.
		kinds: []string{"token:id"},
		why:   "is produced by no attestor: a join token grants the SPIFFE ID it was made for directly (meshid token create --spiffe-id)",
	},
}

// elsewhere says where a kind that is not built in comes from, if it is
// one of notHere's.
func elsewhere(kind string) (string, bool) {
	for _, n := range notHere {
		if slices.Contains(n.kinds, kind) {
			return n.why, true
		}
	}
	return "", false
}
