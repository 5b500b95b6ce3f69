package migrate_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meshid/meshid/store"
	"github.com/meshid/meshid/store/boltstore"
	"github.com/meshid/meshid/store/migrate"
	"github.com/meshid/meshid/store/storetest"
)

func TestParse(t *testing.T) {
	file := filepath.Join(t.TempDir(), "meshid.db")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	good := map[string]migrate.Target{
		"bolt:/var/lib/meshid/":                    {Backend: "bolt", Dir: "/var/lib/meshid"},
		"bolt:data":                                {Backend: "bolt", Dir: "data"},
		"etcd:https://e1:2379":                     {Backend: "etcd", Endpoints: []string{"https://e1:2379"}},
		"etcd:https://e1:2379,http://127.0.0.1:23": {Backend: "etcd", Endpoints: []string{"https://e1:2379", "http://127.0.0.1:23"}},
	}
	for spec, want := range good {
		got, err := migrate.Parse(spec)
		if err != nil || got.String() != want.String() || got.Backend != want.Backend || got.Dir != want.Dir || len(got.Endpoints) != len(want.Endpoints) {
			t.Errorf("Parse(%q) = %+v, %v; want %+v", spec, got, err, want)
		}
	}
	bad := map[string]string{
		"/var/lib/meshid":          "want bolt:DIR",
		"bolt:":                    "data dir",
		"bolt:" + file:             "is a file",
		"sqlite:/x":                `unknown backend "sqlite"`,
		"etcd:":                    "not an http",
		"etcd:e1:2379":             "not an http",
		"etcd:https://e1:2379,":    "not an http",
		"etcd:ftp://e1:2379":       "not an http",
		"etcd:https://e1:2379/pfx": "not an http",
	}
	for spec, want := range bad {
		if _, err := migrate.Parse(spec); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(%q) = %v, want an error saying %q", spec, err, want)
		}
	}
}

func filledDir(t *testing.T) (string, store.SnapshotCounts) {
	t.Helper()
	dir := t.TempDir()
	s, err := boltstore.Open(filepath.Join(dir, migrate.BoltFile), boltstore.Options{UnsafeNoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	want := storetest.FillForMigration(t, s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	return dir, want
}

func target(t *testing.T, spec string) migrate.Target {
	t.Helper()
	tg, err := migrate.Parse(spec)
	if err != nil {
		t.Fatal(err)
	}
	return tg
}

func fileBytes(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestRunBoltToBolt: the copy is checked and reported, then a second run
// into the now full target is refused naming what is there, and a source
// held by another process is refused with "stop the server first"; the
// refusals change no file.
func TestRunBoltToBolt(t *testing.T) {
	ctx := context.Background()
	src, want := filledDir(t)
	dstDir := filepath.Join(t.TempDir(), "new", "data")
	var lines []string
	rep, err := migrate.Run(ctx, migrate.DefaultOpeners(), target(t, "bolt:"+src), target(t, "bolt:"+dstDir), nil, func(l string) { lines = append(lines, l) })
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK() || rep.Source != want || rep.Target != want || len(rep.Bundle) != 4 || len(rep.Differences) != 0 {
		t.Fatalf("report %+v; want counts %+v on both sides and the 4 published CAs and keys", rep, want)
	}
	if len(lines) != 4 || !strings.Contains(lines[1], "5 CA records") {
		t.Fatalf("progress lines %q", lines)
	}

	srcFile, dstFile := filepath.Join(src, migrate.BoltFile), filepath.Join(dstDir, migrate.BoltFile)
	before := fileBytes(t, dstFile)
	_, err = migrate.Run(ctx, migrate.DefaultOpeners(), target(t, "bolt:"+src), target(t, "bolt:"+dstDir), nil, nil)
	if !errors.Is(err, migrate.ErrNotEmpty) || !strings.Contains(err.Error(), "4 entries") {
		t.Fatalf("second run into the same target: %v, want ErrNotEmpty naming the 4 entries", err)
	}
	if fileBytes(t, dstFile) != before {
		t.Fatal("the refused run changed the target file")
	}

	srcBefore := fileBytes(t, srcFile)
	held, err := boltstore.Open(srcFile, boltstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	other := filepath.Join(t.TempDir(), "other")
	_, err = migrate.Run(ctx, migrate.DefaultOpeners(), target(t, "bolt:"+src), target(t, "bolt:"+other), nil, nil)
	if err == nil || !strings.Contains(err.Error(), "stop the server first") {
		t.Fatalf("run from a held source: %v", err)
	}
	if _, err := os.Stat(other); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the refused run made the target dir: %v", err)
	}
	held.Close()
	if fileBytes(t, srcFile) != srcBefore {
		t.Fatal("the refused run changed the source file")
	}

	for _, tc := range []struct{ from, to, want string }{
		{"bolt:" + src, "bolt:" + src + "/.", "the same store"},
		{"bolt:" + t.TempDir(), "bolt:" + other, "no meshid store"},
		{"bolt:" + src, "etcd:http://127.0.0.1:1", "no etcd backend"},
	} {
		_, err := migrate.Run(ctx, migrate.DefaultOpeners(), target(t, tc.from), target(t, tc.to), nil, nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s -> %s: %v, want %q", tc.from, tc.to, err, tc.want)
		}
		if _, err := os.Stat(other); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("%s -> %s made the target dir", tc.from, tc.to)
		}
	}
}

// spoiled wraps a store so that its Export (or, after an import, its
// read-back) is not what it holds: the failures Run must clean up after.
type spoiled struct {
	*boltstore.Store
	export func(store.Snapshot) store.Snapshot
}

func (s spoiled) Export(ctx context.Context) (store.Snapshot, error) {
	snap, err := s.Store.Export(ctx)
	if err == nil && s.export != nil {
		snap = s.export(snap)
	}
	return snap, err
}

// TestRunFailureRemovesNewTarget: an import that fails, and one whose
// read-back differs, leave no target file behind.
func TestRunFailureRemovesNewTarget(t *testing.T) {
	ctx := context.Background()
	src, _ := filledDir(t)
	wrap := func(source bool, fn func(store.Snapshot) store.Snapshot) migrate.Openers {
		return migrate.Openers{"bolt": func(ctx context.Context, tg migrate.Target, o migrate.OpenOptions) (store.Store, error) {
			s, err := migrate.OpenBolt(ctx, tg, o)
			if err != nil || o.Source != source {
				return s, err
			}
			imported := false
			return spoiled{Store: s.(*boltstore.Store), export: func(snap store.Snapshot) store.Snapshot {
				if !source && !imported { // the target's emptiness check
					imported = true
					return snap
				}
				return fn(snap)
			}}, nil
		}}
	}
	cases := map[string]struct {
		openers migrate.Openers
		want    string
	}{
		"invalid source rows": {wrap(true, func(s store.Snapshot) store.Snapshot {
			s.CAs = append(s.CAs, s.CAs[0])
			return s
		}), "repeated id"},
		"a row lost on the target": {wrap(false, func(s store.Snapshot) store.Snapshot {
			s.Agents = s.Agents[1:]
			return s
		}), "rows match false"},
	}
	for name, tc := range cases {
		t.Run(strings.ReplaceAll(name, " ", "_"), func(t *testing.T) {
			dst := filepath.Join(t.TempDir(), "fresh")
			rep, err := migrate.Run(ctx, tc.openers, target(t, "bolt:"+src), target(t, "bolt:"+dst), nil, nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("run: %v, want %q (report %+v)", err, tc.want, rep)
			}
			if _, err := os.Stat(dst); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("the failed run left the target dir: %v", err)
			}
		})
	}
}
