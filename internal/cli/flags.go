package cli

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/common/model"
	"github.com/spf13/pflag"
)

// durationValue is a time.Duration flag that also takes days ("7d"), the
// unit operators think in for certificate lifetimes.
type durationValue time.Duration

func newDuration(p *time.Duration, def time.Duration) *durationValue {
	*p = def
	return (*durationValue)(p)
}

// ParseDuration parses a Go duration ("90m", "1.5h"), a number of days
// ("30d", "0.5d"), or Prometheus's form with days, weeks and years
// combined ("1d12h", "2w", "1y"; a year is 365 days).
func ParseDuration(s string) (time.Duration, error) {
	if d, ok := strings.CutSuffix(s, "d"); ok {
		if n, err := strconv.ParseFloat(d, 64); err == nil {
			return time.Duration(n * float64(24*time.Hour)), nil
		}
	}
	if v, err := time.ParseDuration(s); err == nil {
		return v, nil
	}
	// model.ParseDuration takes whole units only, largest first, without
	// a sign: "1d12h", "1w", "1y", "1h30m".
	if v, err := model.ParseDuration(s); err == nil {
		return time.Duration(v), nil
	}
	return 0, fmt.Errorf("invalid duration %q (use e.g. 30s, 1h, 7d, 1d12h, 2w, 1y)", s)
}

func (d *durationValue) Set(s string) error {
	v, err := ParseDuration(s)
	if err != nil {
		return err
	}
	*d = durationValue(v)
	return nil
}

func (d *durationValue) Type() string { return "duration" }

func (d *durationValue) String() string {
	v := time.Duration(*d)
	if v != 0 && v%(24*time.Hour) == 0 {
		return fmt.Sprintf("%dd", v/(24*time.Hour))
	}
	return v.String()
}

func durationFlag(fs *pflag.FlagSet, p *time.Duration, name string, def time.Duration, usage string) {
	fs.Var(newDuration(p, def), name, usage)
}

// outputFlag adds -o/--output with table (default), json and yaml.
func outputFlag(fs *pflag.FlagSet, p *string) {
	fs.StringVarP(p, "output", "o", "table", "output format: table, json or yaml")
}

func checkOutput(o string) error {
	if o != "table" && !structured(o) {
		return fmt.Errorf("unknown output format %q (want table, json or yaml)", o)
	}
	return nil
}

// structured reports whether o asks for a document (json or yaml) rather
// than the table; a command writes it with writeOut, writeOutMessage or
// writeOutList, which turn one JSON document into YAML for -o yaml.
func structured(o string) bool { return o == "json" || o == "yaml" }
