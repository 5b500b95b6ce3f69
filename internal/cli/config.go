package cli

import (
	"bytes"
	"fmt"
	"os"
	"strings"

	"github.com/spf13/pflag"
	"go.yaml.in/yaml/v3"
)

// applyConfigFile fills flags still unset (neither on the command line nor
// from MESHID_* variables) from a YAML file of flag names to values, e.g.
//
//	trust-domain: example.org
//	svid-ttl: 12h
//	server-dns: [meshid.example.org, localhost]
//
// so the precedence is: flags, then environment, then file, then defaults.
// An unknown key is an error: a typo must not silently fall back to a
// default.
func applyConfigFile(fs *pflag.FlagSet, path string) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("--config: %w", err)
	}
	var m map[string]any
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	if err := dec.Decode(&m); err != nil {
		return fmt.Errorf("--config %s: %w", path, err)
	}
	for key, v := range m {
		f := fs.Lookup(key)
		if f == nil || key == "config" {
			return fmt.Errorf("--config %s: unknown setting %q (keys are the command's flag names, e.g. trust-domain)", path, key)
		}
		if f.Changed {
			continue
		}
		if list, ok := v.([]any); ok {
			sv, ok := f.Value.(pflag.SliceValue)
			if !ok {
				return fmt.Errorf("--config %s: %s takes one value, not a list", path, key)
			}
			vals := make([]string, len(list))
			for i, x := range list {
				vals[i] = fmt.Sprint(x)
			}
			if err := sv.Replace(vals); err != nil {
				return fmt.Errorf("--config %s: %s: %w", path, key, err)
			}
			continue
		}
		if err := fs.Set(key, strings.TrimSpace(fmt.Sprint(v))); err != nil {
			return fmt.Errorf("--config %s: %s: %w", path, key, err)
		}
	}
	return nil
}
