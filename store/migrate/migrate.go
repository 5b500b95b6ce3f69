// Package migrate copies a meshid store from one backend to another (bolt
// to etcd, and back for a rollback): `meshid store migrate`. The copy is
// verbatim (store.Migrator): sealed CA keys stay sealed, so no
// key-encryption key is needed to migrate, and the servers on the target
// use the same KEK as before. After the copy the target is read back and
// checked: rows per kind, the trust bundle, and every row.
package migrate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/meshid/meshid/store"
	"github.com/meshid/meshid/store/boltstore"
)

// Backends a spec can name.
const (
	Bolt = "bolt"
	Etcd = "etcd"
)

// BoltFile is the store's file in a server's data dir (controlplane opens
// <DataDir>/meshid.db).
const BoltFile = "meshid.db"

// Target is one side of a migration, as Parse reads it from a spec.
type Target struct {
	Backend string
	// Dir is a bolt target's data dir (the server's --data-dir).
	Dir string
	// Endpoints are an etcd target's client URLs.
	Endpoints []string
}

// String is the target as a spec.
func (t Target) String() string {
	if t.Backend == Bolt {
		return Bolt + ":" + t.Dir
	}
	return t.Backend + ":" + strings.Join(t.Endpoints, ",")
}

// Parse reads a spec: bolt:DIR (a server's data dir) or
// etcd:URL[,URL...] (etcd client URLs, http or https).
func Parse(spec string) (Target, error) {
	backend, rest, ok := strings.Cut(spec, ":")
	switch {
	case !ok:
		return Target{}, fmt.Errorf("store %q: want bolt:DIR or etcd:URL[,URL...]", spec)
	case backend == Bolt:
		if rest == "" {
			return Target{}, fmt.Errorf("store %q: bolt: needs the server's data dir (bolt:/var/lib/meshid)", spec)
		}
		if fi, err := os.Stat(rest); err == nil && !fi.IsDir() {
			return Target{}, fmt.Errorf("store %q: %s is a file; give the data dir that holds %s", spec, rest, BoltFile)
		}
		return Target{Backend: Bolt, Dir: filepath.Clean(rest)}, nil
	case backend == Etcd:
		var eps []string
		for ep := range strings.SplitSeq(rest, ",") {
			u, err := url.Parse(ep)
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") {
				return Target{}, fmt.Errorf("store %q: etcd endpoint %q is not an http:// or https:// URL with a host", spec, ep)
			}
			eps = append(eps, ep)
		}
		return Target{Backend: Etcd, Endpoints: eps}, nil
	}
	return Target{}, fmt.Errorf("store %q: unknown backend %q, want bolt:DIR or etcd:URL[,URL...]", spec, backend)
}

// OpenOptions tells an Opener how the store will be used.
type OpenOptions struct {
	// Source is set when the store is read from: an Opener must not
	// create one that does not exist.
	Source bool
	Logger *slog.Logger
}

// Opener opens the store a Target names.
type Opener func(ctx context.Context, t Target, o OpenOptions) (store.Store, error)

// Openers are the Openers by Target.Backend. The CLI adds etcd's, which
// needs the TLS flags.
type Openers map[string]Opener

// DefaultOpeners holds the bolt Opener.
func DefaultOpeners() Openers { return Openers{Bolt: OpenBolt} }

// OpenBolt opens <t.Dir>/meshid.db. A source must exist; a running
// server's lock gives an error saying to stop it.
func OpenBolt(_ context.Context, t Target, o OpenOptions) (store.Store, error) {
	path := filepath.Join(t.Dir, BoltFile)
	if o.Source {
		if _, err := os.Stat(path); err != nil {
			return nil, fmt.Errorf("no meshid store in %s (%v)", t.Dir, err)
		}
	}
	s, err := boltstore.Open(path, boltstore.Options{Logger: o.Logger})
	if err != nil {
		return nil, err
	}
	return s, nil
}

// Report is what a migration did and what its check found.
type Report struct {
	From string `json:"from"`
	To   string `json:"to"`
	// Source is what was exported, Target what the target holds after.
	Source store.SnapshotCounts `json:"source"`
	Target store.SnapshotCounts `json:"target"`
	// CountsMatch: every kind has as many rows on both sides.
	CountsMatch bool `json:"counts_match"`
	// Bundle is the source's trust bundle (store.Snapshot.TrustBundle);
	// BundleMatch says whether the target's is the same set.
	Bundle      []string `json:"bundle"`
	BundleMatch bool     `json:"bundle_match"`
	// RowsMatch: every row reads back as exported; Differences lists the
	// first rows that do not (never a secret).
	RowsMatch   bool     `json:"rows_match"`
	Differences []string `json:"differences,omitempty"`
}

// OK reports whether the check passed.
func (r *Report) OK() bool { return r.CountsMatch && r.BundleMatch && r.RowsMatch }

// ErrNotEmpty is wrapped by the error of a migration into a target that
// already holds something.
var ErrNotEmpty = errors.New("target store is not empty")

const maxDifferences = 20

// Migrate copies from into to, which must hold nothing, and checks the
// copy. progress, if not nil, gets one line per step. The Report is filled
// as far as the migration got; an error after the import means the target
// holds the copy but it failed the check.
func Migrate(ctx context.Context, from, to store.Store, progress func(string)) (Report, error) {
	var rep Report
	say := func(format string, args ...any) {
		if progress != nil {
			progress(fmt.Sprintf(format, args...))
		}
	}
	src, ok := from.(store.Migrator)
	if !ok {
		return rep, fmt.Errorf("the source store (%T) cannot be exported", from)
	}
	dst, ok := to.(store.Migrator)
	if !ok {
		return rep, fmt.Errorf("the target store (%T) cannot be imported into", to)
	}
	say("exporting the source")
	snap, err := src.Export(ctx)
	if err != nil {
		return rep, fmt.Errorf("export the source: %w", err)
	}
	rep.Source = snap.Counts()
	rep.Bundle = snap.TrustBundle()
	say("source holds %s", rep.Source)

	// Looked at first so that the refusal can say what is there; Import
	// refuses a non-empty store itself too.
	held, err := dst.Export(ctx)
	if err != nil {
		return rep, fmt.Errorf("read the target: %w", err)
	}
	if c := held.Counts(); !c.Empty() {
		return rep, fmt.Errorf("%w: it holds %s; migrate only into an empty store (a new data dir, or an unused etcd prefix)", ErrNotEmpty, c)
	}
	say("importing into the target")
	if err := dst.Import(ctx, snap); err != nil {
		if errors.Is(err, store.ErrAlreadyExists) {
			return rep, fmt.Errorf("%w: written to while migrating: %v", ErrNotEmpty, err)
		}
		return rep, fmt.Errorf("import into the target (it may hold part of the copy: wipe it before a retry): %w", err)
	}
	say("verifying the target")
	again, err := dst.Export(ctx)
	if err != nil {
		return rep, fmt.Errorf("read the target back: %w", err)
	}
	rep.Target = again.Counts()
	rep.CountsMatch = rep.Source == rep.Target
	rep.BundleMatch = slices.Equal(rep.Bundle, again.TrustBundle())
	diff := store.DiffSnapshots(snap, again)
	rep.RowsMatch = len(diff) == 0
	if len(diff) > maxDifferences {
		diff = append(diff[:maxDifferences], fmt.Sprintf("... and %d more", len(diff)-maxDifferences))
	}
	rep.Differences = diff
	if !rep.OK() {
		return rep, fmt.Errorf("the target does not read back as the source was exported (counts match %v, bundle match %v, rows match %v): wipe it before a retry",
			rep.CountsMatch, rep.BundleMatch, rep.RowsMatch)
	}
	return rep, nil
}

// Run opens both targets with openers and migrates. A bolt target it
// created is removed again when the migration fails, so that a failed run
// changes nothing there.
func Run(ctx context.Context, openers Openers, from, to Target, log *slog.Logger, progress func(string)) (Report, error) {
	rep := Report{From: from.String(), To: to.String()}
	if same(from, to) {
		return rep, fmt.Errorf("source and target are the same store (%s)", from)
	}
	open := func(t Target, source bool) (store.Store, error) {
		op := openers[t.Backend]
		if op == nil {
			return nil, fmt.Errorf("no %s backend in this build", t.Backend)
		}
		return op(ctx, t, OpenOptions{Source: source, Logger: log})
	}
	src, err := open(from, true)
	if errors.Is(err, store.ErrLocked) {
		return rep, fmt.Errorf("source %s is in use by a running meshid server: stop the server first (%v)", from, err)
	}
	if err != nil {
		return rep, fmt.Errorf("open source %s: %w", from, err)
	}
	defer src.Close()

	var created []string // what opening a bolt target made, innermost last
	if to.Backend == Bolt {
		for d := to.Dir; ; d = filepath.Dir(d) {
			if _, err := os.Stat(d); err == nil || filepath.Dir(d) == d {
				break
			}
			created = append([]string{d}, created...)
		}
		if _, err := os.Stat(filepath.Join(to.Dir, BoltFile)); errors.Is(err, os.ErrNotExist) {
			created = append(created, filepath.Join(to.Dir, BoltFile))
		}
	}
	dst, err := open(to, false)
	if errors.Is(err, store.ErrLocked) {
		return rep, fmt.Errorf("target %s is in use by a running meshid server: stop the server first (%v)", to, err)
	}
	if err != nil {
		removeAll(created)
		return rep, fmt.Errorf("open target %s: %w", to, err)
	}
	r, err := Migrate(ctx, src, dst, progress)
	r.From, r.To = rep.From, rep.To
	cerr := dst.Close()
	if err == nil && cerr != nil {
		err = fmt.Errorf("close target %s: %w", to, cerr)
	}
	if err != nil {
		removeAll(created)
		return r, err
	}
	return r, nil
}

// removeAll removes paths, innermost (last) first; a directory that is
// not empty stays.
func removeAll(paths []string) {
	for i := len(paths) - 1; i >= 0; i-- {
		_ = os.Remove(paths[i])
	}
}

func same(a, b Target) bool {
	if a.Backend != b.Backend {
		return false
	}
	if a.Backend == Bolt {
		ad, _ := filepath.Abs(a.Dir)
		bd, _ := filepath.Abs(b.Dir)
		if ad == bd {
			return true
		}
		ai, aerr := os.Stat(a.Dir)
		bi, berr := os.Stat(b.Dir)
		return aerr == nil && berr == nil && os.SameFile(ai, bi)
	}
	// The same endpoints may hold two stores under two prefixes: that is
	// the opener's to tell apart.
	return false
}
