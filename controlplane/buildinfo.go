package controlplane

import (
	"runtime"
	"runtime/debug"

	"github.com/prometheus/client_golang/prometheus"
)

// Version is the release this binary reports in meshid_build_info, set at
// link time (-ldflags "-X github.com/meshid/meshid/controlplane.Version=v1.2.3";
// the Makefile sets it with the CLI's). Empty: the module version, or "dev".
var Version = ""

// Revision is the VCS commit reported in meshid_build_info, set at link
// time like Version; empty: the one go build stamped, or "unknown".
var Revision = ""

// BuildVersion is the version meshid reports: Version, else the module
// version go install recorded, else "dev".
func BuildVersion() string {
	if Version != "" {
		return Version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "dev"
}

// buildRevision is Revision, else the VCS commit go build stamped into the
// binary, else "unknown" (go run, -buildvcs=false).
func buildRevision() string {
	if Revision != "" {
		return Revision
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && s.Value != "" {
				return s.Value
			}
		}
	}
	return "unknown"
}

// newBuildInfo is meshid_build_info: always 1, labelled with what runs, so
// a dashboard can tell which servers a rollout has reached.
func newBuildInfo() prometheus.Collector {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "meshid_build_info",
		Help: "Always 1; the labels say which build of meshid is running.",
	}, []string{"version", "revision", "goversion"})
	g.WithLabelValues(BuildVersion(), buildRevision(), runtime.Version()).Set(1)
	return g
}
