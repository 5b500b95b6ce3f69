package lifecycle

import (
	"testing"
	"time"

	"github.com/meshid/meshid/store"
)

var t0 = time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)

// A 300-hour CA prepares its successor at 150 h and activates it at 200 h.
var policy = Policy{PrepareAt: 0.5, ActivateAt: 2.0 / 3, PrepareWindow: 48 * time.Hour}

func h(n float64) time.Time { return t0.Add(time.Duration(n * float64(time.Hour))) }

func activeCA() CA {
	return CA{ID: "a", State: store.CAActive, CreatedAt: t0, NotAfter: h(300)}
}

func TestDue(t *testing.T) {
	active := activeCA()
	early := CA{ID: "p", State: store.CAPrepared, CreatedAt: h(150), NotAfter: h(450)}
	late := CA{ID: "p", State: store.CAPrepared, CreatedAt: h(190), NotAfter: h(490)}
	for _, tc := range []struct {
		name     string
		now      time.Time
		active   *CA
		prepared *CA
		want     Step
	}{
		{"no active CA: nothing", h(290), nil, nil, None},
		{"before prepare-at", h(149.99), &active, nil, None},
		{"at prepare-at", h(150), &active, nil, Prepare},
		{"past prepare-at", h(170), &active, nil, Prepare},
		{"prepared, before activate-at", h(199.9), &active, &early, None},
		{"prepared, at activate-at", h(200), &active, &early, Activate},
		{"prepared late: activate-at passed but the window has not", h(200), &active, &late, None},
		{"prepared late: window passed", h(238), &active, &late, Activate},
		{"prepared, nothing more to prepare", h(160), &active, &early, None},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := policy.Due(tc.now, tc.active, tc.prepared); got != tc.want {
				t.Fatalf("Due(%s) = %s, want %s", tc.now.Sub(t0), got, tc.want)
			}
		})
	}
}

func TestActivateTime(t *testing.T) {
	active := activeCA()
	for _, tc := range []struct {
		preparedAt, want time.Time
	}{
		{h(150), h(200)}, // window ends at 198 h: the life fraction rules
		{h(152), h(200)}, // window ends exactly at 200 h
		{h(160), h(208)}, // window rules
	} {
		p := CA{State: store.CAPrepared, CreatedAt: tc.preparedAt, NotAfter: tc.preparedAt.Add(300 * time.Hour)}
		if got := policy.ActivateTime(active, p); !got.Equal(tc.want) {
			t.Errorf("prepared at %s: activate at %s, want %s", tc.preparedAt.Sub(t0), got.Sub(t0), tc.want.Sub(t0))
		}
	}
}

func TestInBundle(t *testing.T) {
	for _, tc := range []struct {
		name string
		c    CA
		now  time.Time
		want bool
	}{
		{"active", activeCA(), h(10), true},
		{"active past expiry", activeCA(), h(300.01), false},
		{"prepared", CA{State: store.CAPrepared, NotAfter: h(400)}, h(10), true},
		{"retired, its SVIDs live", CA{State: store.CARetired, NotAfter: h(300), LastNotAfter: h(224)}, h(223), true},
		{"retired, last SVID expired", CA{State: store.CARetired, NotAfter: h(300), LastNotAfter: h(224)}, h(224), false},
		{"retired, signed nothing", CA{State: store.CARetired, NotAfter: h(300)}, h(1), false},
		{"tainted with dependents", CA{State: store.CATainted, NotAfter: h(300), LastNotAfter: h(224), Dependents: 3}, h(200), true},
		{"tainted without dependents", CA{State: store.CATainted, NotAfter: h(300), LastNotAfter: h(224)}, h(200), false},
		{"revoked", CA{State: store.CARevoked, NotAfter: h(300), LastNotAfter: h(224), Dependents: 3}, h(1), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := InBundle(tc.now, tc.c); got != tc.want {
				t.Fatalf("InBundle = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestNext(t *testing.T) {
	active := activeCA()
	prepared := CA{ID: "p", State: store.CAPrepared, CreatedAt: h(160), NotAfter: h(460)}
	retired := CA{ID: "r", State: store.CARetired, CreatedAt: h(-200), NotAfter: h(100), LastNotAfter: h(20)}
	for _, tc := range []struct {
		name   string
		now    time.Time
		cas    []CA
		also   []time.Time
		want   time.Time
		wantOK bool
	}{
		{"nothing", h(0), nil, nil, time.Time{}, false},
		{"prepare next", h(0), []CA{active}, nil, h(150), true},
		{"activate next, window rules", h(170), []CA{active, prepared}, nil, h(208), true},
		{"a retired CA leaves first", h(0), []CA{retired, active}, nil, h(20).Add(time.Millisecond), true},
		{"a retired CA already gone is not planned", h(21), []CA{retired, active}, nil, h(150), true},
		{"an extra moment first", h(0), []CA{active}, []time.Time{h(3)}, h(3), true},
		{"zero extra moments are ignored", h(0), []CA{active}, []time.Time{{}}, h(150), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := policy.Next(tc.now, tc.cas, tc.also...)
			if ok != tc.wantOK || !got.Equal(tc.want) {
				t.Fatalf("Next = %s, %v; want %s, %v", got.Sub(t0), ok, tc.want.Sub(t0), tc.wantOK)
			}
		})
	}
}
