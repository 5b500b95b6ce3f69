package entry

import (
	"fmt"
	"slices"
	"strconv"
	"sync"
	"testing"
)

func sels(ss ...string) []Selector {
	out := make([]Selector, len(ss))
	for i, s := range ss {
		sel, err := Parse(s)
		if err != nil {
			panic(err)
		}
		out[i] = sel
	}
	return out
}

func ids(es []Entry) []string {
	out := []string{}
	for _, e := range es {
		out = append(out, e.ID)
	}
	return out
}

const td = "spiffe://cluster.local/"

// A caller matches an entry when it has every one of the entry's selectors
// (the entry's set is a subset of the caller's), whatever else it has;
// matches are ordered by SPIFFE ID, then ID.
func TestIndexMatch(t *testing.T) {
	x := NewIndex()
	for _, e := range []Entry{
		{ID: "a", SpiffeID: td + "web", Selectors: sels("unix:uid:1000")},
		{ID: "b", SpiffeID: td + "db", Selectors: sels("unix:path:/usr/bin/db", "unix:uid:1000")},
		{ID: "c", SpiffeID: td + "web", Selectors: sels("unix:gid:50", "unix:uid:1000")},
		{ID: "d", SpiffeID: td + "x", Selectors: sels("unix:pid:7", "unix:uid:0")},
		{ID: "e", SpiffeID: td + "dup", Selectors: sels("unix:uid:9", "unix:uid:9")}, // not normalized
		{ID: "f", SpiffeID: td + "none"},                                             // no selectors: never matches
	} {
		x.Put(e)
	}
	for _, tt := range []struct {
		caller []string
		want   []string
	}{
		{[]string{"unix:uid:1000"}, []string{"a"}},
		{[]string{"unix:uid:1000", "unix:path:/usr/bin/db"}, []string{"b", "a"}},
		{[]string{"unix:gid:50", "unix:uid:1000"}, []string{"a", "c"}},
		{[]string{"unix:gid:50"}, []string{}},
		{[]string{"unix:path:/usr/bin/db"}, []string{}},
		{[]string{"unix:uid:0", "unix:pid:7", "unix:gid:0"}, []string{"d"}},
		{[]string{"unix:uid:0", "unix:pid:8"}, []string{}},
		{[]string{"unix:uid:1000", "unix:uid:1000"}, []string{"a"}},
		{[]string{"unix:pid:7", "unix:uid:1000", "unix:gid:50", "unix:path:/usr/bin/db"}, []string{"b", "a", "c"}},
		{[]string{"unix:uid:9"}, []string{"e"}},
		{[]string{"uid:1000"}, []string{}},
		{nil, []string{}},
	} {
		if got := ids(x.Match(tt.caller)); !slices.Equal(got, tt.want) {
			t.Errorf("Match(%v) = %v, want %v", tt.caller, got, tt.want)
		}
	}
	if x.Len() != 6 {
		t.Fatalf("Len = %d, want 6", x.Len())
	}
	if e, ok := x.Get("b"); !ok || e.SpiffeID != td+"db" {
		t.Fatalf("Get(b) = %+v, %v", e, ok)
	}
	if _, ok := x.Get("zz"); ok {
		t.Fatal("Get of a missing ID found something")
	}
	if got := ids(x.BySpiffeID(td + "web")); !slices.Equal(got, []string{"a", "c"}) {
		t.Fatalf("BySpiffeID(web) = %v", got)
	}
}

// Removing an entry stops it matching and leaves the others; removing
// every entry leaves nothing indexed (no leak per selector ever used).
func TestIndexRemove(t *testing.T) {
	x := NewIndex()
	x.Put(Entry{ID: "a", SpiffeID: td + "a", Selectors: sels("unix:uid:1")})
	x.Put(Entry{ID: "b", SpiffeID: td + "b", Selectors: sels("unix:uid:1", "unix:gid:2")})
	x.Put(Entry{ID: "e", SpiffeID: td + "e", Selectors: sels("unix:uid:3", "unix:uid:3")})
	x.Remove("a")
	x.Remove("no-such-entry")
	if got := ids(x.Match([]string{"unix:uid:1", "unix:gid:2"})); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("after removing a: %v", got)
	}
	if _, ok := x.Get("a"); ok || x.Len() != 2 || len(x.BySpiffeID(td+"a")) != 0 {
		t.Fatalf("a still there: len %d", x.Len())
	}
	x.Remove("b")
	x.Remove("e")
	if got := x.Match([]string{"unix:uid:1", "unix:gid:2", "unix:uid:3"}); len(got) != 0 || x.Len() != 0 {
		t.Fatalf("after removing all: %v, len %d", got, x.Len())
	}
	if len(x.bySelector) != 0 {
		t.Fatalf("selectors still indexed after every entry was removed: %v", x.bySelector)
	}
}

// Put of an ID already there replaces that entry: its old selectors stop
// matching at once, and after it is removed nothing of either version is
// matched (no ghost entry for a selector only the old version had).
func TestIndexPutReplaces(t *testing.T) {
	x := NewIndex()
	x.Put(Entry{ID: "a", SpiffeID: td + "old", Selectors: sels("unix:uid:1")})
	x.Put(Entry{ID: "a", SpiffeID: td + "new", Selectors: sels("unix:uid:2")})
	if got := x.Match([]string{"unix:uid:1"}); len(got) != 0 {
		t.Fatalf("old selectors still match %+v", got)
	}
	if got := x.Match([]string{"unix:uid:2"}); len(got) != 1 || got[0].SpiffeID != td+"new" {
		t.Fatalf("new selectors match %+v", got)
	}
	if x.Len() != 1 || len(x.BySpiffeID(td+"old")) != 0 {
		t.Fatalf("len %d, old version listed %v", x.Len(), x.BySpiffeID(td+"old"))
	}
	x.Remove("a")
	if got := x.Match([]string{"unix:uid:1", "unix:uid:2"}); len(got) != 0 {
		t.Fatalf("after removal, matched %+v", got)
	}
	if len(x.bySelector) != 0 {
		t.Fatalf("selectors still indexed: %v", x.bySelector)
	}
}

// Matching while entries are replaced and removed never sees a torn entry:
// every match is a whole version whose selectors the caller has (run
// under -race).
func TestIndexConcurrent(t *testing.T) {
	x := NewIndex()
	caller := []string{"unix:uid:1", "unix:gid:1", "unix:gid:2"}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		for i := range 2000 {
			id := strconv.Itoa(i % 10)
			g := strconv.Itoa(i%2 + 1)
			x.Put(Entry{ID: id, SpiffeID: td + g, Selectors: sels("unix:uid:1", "unix:gid:"+g)})
			if i%3 == 0 {
				x.Remove(id)
			}
		}
	}()
	var bad error
	go func() {
		defer wg.Done()
		for range 2000 {
			for _, e := range x.Match(caller) {
				if want := td + e.Selectors[1].Value[len("gid:"):]; e.SpiffeID != want || len(e.Selectors) != 2 {
					bad = fmt.Errorf("torn match %+v", e)
					return
				}
			}
		}
	}()
	wg.Wait()
	if bad != nil {
		t.Fatal(bad)
	}
}
