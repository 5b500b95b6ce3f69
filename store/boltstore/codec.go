package boltstore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/meshid/meshid/store"
)

// Values are encoded by hand rather than with gob or JSON: inventory rows are
// written on every issuance and read 100k at a time, entries are all loaded
// at start-up, and a varint/length-prefixed layout is both the smallest and
// the cheapest to decode (one allocation per row, see dec).
//
// Every value starts with a one-byte format version. A new layout gets a new
// version byte and the decoder keeps reading the old ones, so a field can be
// added without a schema migration of the whole file.
const (
	svidV1  = 1
	entryV1 = 1
	// entryV2 appends the hint; entries without one are still written as
	// v1, so a store without hints stays readable by older versions.
	entryV2 = 2
	// entryV3 appends the parent after the hint; only entries with a
	// parent are written so.
	entryV3 = 3
	caV1    = 1
	auditV1 = 1
)

// Seconds from year 1 (time.Time's zero) to the Unix epoch. Times are stored
// relative to year 1 so that the zero time encodes as two zero bytes and
// decodes back to exactly time.Time{}.
const unixToInternal = 62135596800

var errCorrupt = errors.New("corrupt value")

// enc appends fields to a byte slice.
type enc struct{ b []byte }

func (e *enc) byte1(v byte)        { e.b = append(e.b, v) }
func (e *enc) uvarint(v uint64)    { e.b = binary.AppendUvarint(e.b, v) }
func (e *enc) varint(v int64)      { e.b = binary.AppendVarint(e.b, v) }
func (e *enc) str(s string)        { e.uvarint(uint64(len(s))); e.b = append(e.b, s...) }
func (e *enc) bytes(p []byte)      { e.uvarint(uint64(len(p))); e.b = append(e.b, p...) }
func (e *enc) dur(d time.Duration) { e.varint(int64(d)) }

func (e *enc) time(t time.Time) {
	e.varint(t.Unix() + unixToInternal)
	e.uvarint(uint64(t.Nanosecond()))
}

// dec reads fields back. It works on a string copy of the bbolt value (which
// is only valid inside the transaction): every string field is then a
// substring of that one allocation instead of an allocation of its own. The
// first error sticks; callers check it once at the end.
type dec struct {
	s   string
	err error
}

func (d *dec) fail() {
	if d.err == nil {
		d.err = errCorrupt
	}
	d.s = ""
}

func (d *dec) byte1() byte {
	if len(d.s) == 0 {
		d.fail()
		return 0
	}
	c := d.s[0]
	d.s = d.s[1:]
	return c
}

// uvarint mirrors binary.Uvarint, which only takes a []byte.
func (d *dec) uvarint() uint64 {
	var x uint64
	var shift uint
	for i := 0; i < len(d.s) && i < binary.MaxVarintLen64; i++ {
		c := d.s[i]
		if c < 0x80 {
			if i == binary.MaxVarintLen64-1 && c > 1 {
				break // overflow
			}
			d.s = d.s[i+1:]
			return x | uint64(c)<<shift
		}
		x |= uint64(c&0x7f) << shift
		shift += 7
	}
	d.fail()
	return 0
}

func (d *dec) varint() int64 {
	ux := d.uvarint()
	x := int64(ux >> 1)
	if ux&1 != 0 {
		x = ^x
	}
	return x
}

// count reads a length and bounds it by what is left, so a corrupt length
// cannot make the caller allocate gigabytes.
func (d *dec) count() int {
	n := d.uvarint()
	if n > uint64(len(d.s)) {
		d.fail()
		return 0
	}
	return int(n)
}

func (d *dec) str() string {
	n := d.count()
	s := d.s[:n]
	d.s = d.s[n:]
	return s
}

// bytes returns a fresh slice; nil for an empty field.
func (d *dec) bytes() []byte {
	s := d.str()
	if s == "" {
		return nil
	}
	return []byte(s)
}

func (d *dec) dur() time.Duration { return time.Duration(d.varint()) }

func (d *dec) time() time.Time {
	sec := d.varint()
	nsec := d.uvarint()
	if nsec >= 1e9 {
		d.fail()
		return time.Time{}
	}
	return time.Unix(sec-unixToInternal, int64(nsec)).UTC()
}

func (d *dec) finish(what string) error {
	if d.err == nil && len(d.s) != 0 {
		d.err = errCorrupt // trailing bytes: not a layout we wrote
	}
	if d.err != nil {
		return fmt.Errorf("decode %s: %w", what, d.err)
	}
	return nil
}

func (d *dec) version(what string, want byte) error {
	if v := d.byte1(); d.err == nil && v != want {
		return fmt.Errorf("decode %s: unknown format version %d", what, v)
	}
	return nil
}

func encodeSVID(s *store.IssuedSVID) []byte {
	e := enc{b: make([]byte, 0, 64+len(s.Serial)+len(s.SpiffeID)+len(s.EntryID)+len(s.Requester)+len(s.CAID))}
	e.byte1(svidV1)
	e.str(s.Serial)
	e.str(s.SpiffeID)
	e.time(s.NotBefore)
	e.time(s.NotAfter)
	e.str(s.EntryID)
	e.str(s.Requester)
	e.str(s.CAID)
	e.time(s.IssuedAt)
	return e.b
}

func decodeSVID(v []byte) (store.IssuedSVID, error) {
	var s store.IssuedSVID
	err := decodeSVIDInto(&s, v)
	return s, err
}

// decodeSVIDInto fills *s in place, so that a listing can decode straight
// into its result slice.
func decodeSVIDInto(s *store.IssuedSVID, v []byte) error {
	d := dec{s: string(v)}
	if err := d.version("svid", svidV1); err != nil {
		return err
	}
	s.Serial = d.str()
	s.SpiffeID = d.str()
	s.NotBefore = d.time()
	s.NotAfter = d.time()
	s.EntryID = d.str()
	s.Requester = d.str()
	s.CAID = d.str()
	s.IssuedAt = d.time()
	return d.finish("svid")
}

func encodeEntry(en *store.Entry) []byte {
	n := 48 + len(en.ID) + len(en.SpiffeID)
	for _, s := range en.Selectors {
		n += 4 + len(s.Type) + len(s.Value)
	}
	for _, dns := range en.DNSNames {
		n += 2 + len(dns)
	}
	e := enc{b: make([]byte, 0, n+len(en.Hint)+len(en.ParentID))}
	switch {
	case en.ParentID != "":
		e.byte1(entryV3)
	case en.Hint != "":
		e.byte1(entryV2)
	default:
		e.byte1(entryV1)
	}
	e.str(en.ID)
	e.str(en.SpiffeID)
	e.uvarint(uint64(len(en.Selectors)))
	for _, s := range en.Selectors {
		e.str(s.Type)
		e.str(s.Value)
	}
	e.dur(en.TTL)
	e.uvarint(uint64(len(en.DNSNames)))
	for _, dns := range en.DNSNames {
		e.str(dns)
	}
	e.time(en.CreatedAt)
	if en.Hint != "" || en.ParentID != "" {
		e.str(en.Hint)
	}
	if en.ParentID != "" {
		e.str(en.ParentID)
	}
	return e.b
}

func decodeEntry(v []byte) (store.Entry, error) {
	d := dec{s: string(v)}
	ver := entryV1
	if len(v) > 0 && (v[0] == entryV2 || v[0] == entryV3) {
		ver = int(v[0])
	}
	if err := d.version("entry", byte(ver)); err != nil {
		return store.Entry{}, err
	}
	var en store.Entry
	en.ID = d.str()
	en.SpiffeID = d.str()
	if n := d.count(); n > 0 {
		en.Selectors = make([]store.Selector, n)
		for i := range en.Selectors {
			en.Selectors[i] = store.Selector{Type: d.str(), Value: d.str()}
		}
	}
	en.TTL = d.dur()
	if n := d.count(); n > 0 {
		en.DNSNames = make([]string, n)
		for i := range en.DNSNames {
			en.DNSNames[i] = d.str()
		}
	}
	en.CreatedAt = d.time()
	if ver >= entryV2 {
		en.Hint = d.str()
	}
	if ver == entryV3 {
		en.ParentID = d.str()
	}
	return en, d.finish("entry")
}

func encodeCA(c *store.CARecord) []byte {
	n := 64 + len(c.ID) + len(c.Kind) + len(c.State) + len(c.CertDER) + len(c.PublicKey) + len(c.SealedKey)
	for _, der := range c.ChainDER {
		n += 4 + len(der)
	}
	e := enc{b: make([]byte, 0, n)}
	e.byte1(caV1)
	e.str(c.ID)
	e.str(c.Kind)
	e.str(string(c.State))
	e.bytes(c.CertDER)
	e.uvarint(uint64(len(c.ChainDER)))
	for _, der := range c.ChainDER {
		e.bytes(der)
	}
	e.bytes(c.PublicKey)
	e.bytes(c.SealedKey)
	e.time(c.NotBefore)
	e.time(c.NotAfter)
	e.time(c.CreatedAt)
	return e.b
}

func decodeCA(v []byte) (store.CARecord, error) {
	d := dec{s: string(v)}
	if err := d.version("ca", caV1); err != nil {
		return store.CARecord{}, err
	}
	var c store.CARecord
	c.ID = d.str()
	c.Kind = d.str()
	c.State = store.CAState(d.str())
	c.CertDER = d.bytes()
	if n := d.count(); n > 0 {
		c.ChainDER = make([][]byte, n)
		for i := range c.ChainDER {
			c.ChainDER[i] = d.bytes()
		}
	}
	c.PublicKey = d.bytes()
	c.SealedKey = d.bytes()
	c.NotBefore = d.time()
	c.NotAfter = d.time()
	c.CreatedAt = d.time()
	return c, d.finish("ca")
}

func encodeAudit(ev *store.AuditEvent) []byte {
	e := enc{b: make([]byte, 0, 24+len(ev.Actor)+len(ev.Action)+len(ev.Target)+len(ev.Detail))}
	e.byte1(auditV1)
	e.time(ev.Time)
	e.str(ev.Actor)
	e.str(ev.Action)
	e.str(ev.Target)
	e.str(ev.Detail)
	return e.b
}

func decodeAudit(v []byte) (store.AuditEvent, error) {
	d := dec{s: string(v)}
	if err := d.version("audit event", auditV1); err != nil {
		return store.AuditEvent{}, err
	}
	ev := store.AuditEvent{
		Time:   d.time(),
		Actor:  d.str(),
		Action: d.str(),
		Target: d.str(),
		Detail: d.str(),
	}
	return ev, d.finish("audit event")
}

// Expiry index keys are 8 bytes of NotAfter in Unix nanoseconds, big-endian
// with the sign bit flipped so that byte order is time order for every
// representable instant, followed by the serial to make keys unique.
const expiryPrefixLen = 8

// Times outside this range have no int64 UnixNano.
var (
	minNanoTime = time.Unix(0, math.MinInt64)
	maxNanoTime = time.Unix(0, math.MaxInt64)
)

func nanosInRange(t time.Time) bool {
	return !t.Before(minNanoTime) && !t.After(maxNanoTime)
}

func expiryPrefix(nanos int64) []byte {
	return binary.BigEndian.AppendUint64(make([]byte, 0, expiryPrefixLen), uint64(nanos)^(1<<63))
}

func expiryKey(notAfter time.Time, serial string) []byte {
	k := make([]byte, expiryPrefixLen, expiryPrefixLen+len(serial))
	binary.BigEndian.PutUint64(k, uint64(notAfter.UnixNano())^(1<<63))
	return append(k, serial...)
}

func expiryKeyNanos(k []byte) int64 {
	return int64(binary.BigEndian.Uint64(k) ^ (1 << 63))
}

// expiryFillPercent: NotAfter is issuance time plus a TTL, so index keys
// arrive almost in order and pages split at the right edge; bbolt's default
// of 0.5 would leave every page half empty for good.
const expiryFillPercent = 0.9
