package revocation

import (
	"errors"
	"testing"
	"time"

	"github.com/meshid/meshid/store"
)

var t0 = time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)

func rs(serial, caID string, notAfter time.Duration) store.RevokedSerial {
	return store.RevokedSerial{Serial: serial, CAID: caID, NotAfter: t0.Add(notAfter), RevokedAt: t0}
}

func TestPutDeleteAreValues(t *testing.T) {
	var empty List
	one, added := empty.Put(rs("0a1b", "ca1", time.Hour))
	if !added || one.Len() != 1 || empty.Len() != 0 {
		t.Fatalf("put: added %v, len %d, the original %d", added, one.Len(), empty.Len())
	}
	if _, again := one.Put(rs("A1B", "ca1", 2*time.Hour)); again {
		t.Fatal("the same serial in another form was added twice")
	}
	if !one.Contains("00A1B") || !one.Contains("a1b") || one.Contains("a1c") {
		t.Fatal("Contains does not compare in normal form")
	}
	two, _ := one.Put(rs("ff", "ca2", time.Hour))
	gone, removed := two.Delete(rs("a1b", "", 0))
	if !removed || gone.Len() != 1 || gone.Contains("a1b") || !two.Contains("a1b") {
		t.Fatalf("delete: removed %v, len %d; the original must keep it", removed, gone.Len())
	}
	if _, again := gone.Delete(rs("a1b", "", 0)); again {
		t.Fatal("deleted twice")
	}
	if e, _ := gone.CRLEntries("ca1", t0); len(e) != 0 {
		t.Fatalf("ca1's CRL lists %d after its only serial left", len(e))
	}
}

func TestNewCountsASerialOnce(t *testing.T) {
	l := New([]store.RevokedSerial{rs("1", "a", time.Hour), rs("01", "a", time.Hour), rs("2", "b", time.Hour)})
	if l.Len() != 2 {
		t.Fatalf("len %d, want 2", l.Len())
	}
}

func TestCRLEntriesAndNextExpiry(t *testing.T) {
	l := New([]store.RevokedSerial{rs("10", "a", time.Hour), rs("11", "a", 3*time.Hour), rs("12", "b", 2*time.Hour)})
	e, err := l.CRLEntries("a", t0.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if len(e) != 1 || e[0].Serial.Text(16) != "11" {
		t.Fatalf("a's CRL at +1h lists %v, want only 11 (10 expired at +1h)", e)
	}
	if next, ok := l.NextExpiry(); !ok || !next.Equal(t0.Add(time.Hour)) {
		t.Fatalf("next expiry %s %v", next, ok)
	}
	if _, ok := (List{}).NextExpiry(); ok {
		t.Fatal("an empty list has a next expiry")
	}
	bad := New([]store.RevokedSerial{rs("zz", "a", time.Hour)})
	if _, err := bad.CRLEntries("a", t0); err == nil {
		t.Fatal("a serial that is not hex was put on a CRL")
	}
}

func TestListed(t *testing.T) {
	l := New([]store.RevokedSerial{rs("10", "a", time.Hour), rs("11", "a", -time.Hour), rs("12", "gone", 2*time.Hour)})
	got := l.Listed(t0, func(caID string) bool { return caID == "a" })
	if len(got) != 1 || !got["10"] {
		t.Fatalf("listed %v, want only 10 (11 expired, 12's CA not published)", got)
	}
}

func TestCheckRoom(t *testing.T) {
	for _, tc := range []struct {
		listed, add, limit int
		ok                 bool
	}{
		{0, 0, 0, true},
		{5, 0, 3, true}, // nothing added never fails, even over the limit
		{2, 1, 3, true},
		{2, 2, 3, false},
		{0, 11, 10, false},
	} {
		err := CheckRoom(tc.listed, tc.add, tc.limit)
		var re *RoomError
		if (err == nil) != tc.ok || (err != nil && (!errors.As(err, &re) || re.Total != tc.listed+tc.add)) {
			t.Errorf("CheckRoom(%d, %d, %d) = %v", tc.listed, tc.add, tc.limit, err)
		}
	}
}
