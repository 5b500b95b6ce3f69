package cli

import (
	"fmt"
	"io"
	"log/slog"

	"github.com/spf13/pflag"
)

// logFormatFlag adds --log-format: text for people, json for log shippers
// (Loki, Elasticsearch, Cloud Logging) that would otherwise parse key=value.
func logFormatFlag(fs *pflag.FlagSet, p *string) {
	fs.StringVar(p, "log-format", "text", "log line format: text or json")
}

// newLogger builds the one logger a command passes down: level and format
// come from its flags.
func newLogger(w io.Writer, level, format string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: l}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("log format %q: want text or json", format)
}
