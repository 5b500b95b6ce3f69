package cli

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"
)

func TestConfigFilePrecedence(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "meshid.yaml")
	if err := os.WriteFile(cfg, []byte("trust-domain: file.example\nsvid-ttl: 12h\nlog-level: debug\nserver-dns: [a.example, b.example]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var f serverFlags
	cmd := &cobra.Command{Use: "server"}
	f.register(cmd, "", "")
	t.Setenv("MESHID_LOG_LEVEL", "warn")
	if err := cmd.Flags().Parse([]string{"--config", cfg, "--svid-ttl", "1h"}); err != nil {
		t.Fatal(err)
	}
	if err := applyEnv(cmd.Flags()); err != nil {
		t.Fatal(err)
	}
	if err := applyConfigFile(cmd.Flags(), cfg); err != nil {
		t.Fatal(err)
	}
	if f.trustDomain != "file.example" {
		t.Errorf("trust domain %q: the file should fill an unset flag", f.trustDomain)
	}
	if f.svidTTL != time.Hour {
		t.Errorf("svid ttl %s: the command line should win over the file", f.svidTTL)
	}
	if f.logLevel != "warn" {
		t.Errorf("log level %q: the environment should win over the file", f.logLevel)
	}
	if strings.Join(f.serverDNS, ",") != "a.example,b.example" {
		t.Errorf("server dns %v", f.serverDNS)
	}

	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte("trust-domian: typo.example\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var g serverFlags
	cmd2 := &cobra.Command{Use: "server"}
	g.register(cmd2, "", "")
	if err := applyConfigFile(cmd2.Flags(), bad); err == nil || !strings.Contains(err.Error(), "trust-domian") {
		t.Fatalf("a misspelled key: %v", err)
	}
}
