package bench

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Latency summarises a set of durations.
type Latency struct {
	Count int           `json:"count"`
	P50   time.Duration `json:"p50_ns"`
	P99   time.Duration `json:"p99_ns"`
	Max   time.Duration `json:"max_ns"`
}

func summarize(d []time.Duration) Latency {
	if len(d) == 0 {
		return Latency{}
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return Latency{Count: len(s), P50: s[len(s)/2], P99: s[min(len(s)*99/100, len(s)-1)], Max: s[len(s)-1]}
}

// ServerSample is one scrape of the server's process metrics.
type ServerSample struct {
	RSSBytes       float64 `json:"rss_bytes"`
	HeapInuseBytes float64 `json:"heap_inuse_bytes"`
	StackInuse     float64 `json:"stack_inuse_bytes"`
	Goroutines     float64 `json:"goroutines"`
	SDSStreams     float64 `json:"sds_streams"`
}

// PerStream is the growth between two samples divided by the streams.
type PerStream struct {
	RSSBytes       float64 `json:"rss_bytes"`
	HeapInuseBytes float64 `json:"heap_inuse_bytes"`
	StackInuse     float64 `json:"stack_inuse_bytes"`
	Goroutines     float64 `json:"goroutines"`
}

func perStream(before, after ServerSample, n int) PerStream {
	if n <= 0 {
		return PerStream{}
	}
	f := float64(n)
	return PerStream{
		RSSBytes:       (after.RSSBytes - before.RSSBytes) / f,
		HeapInuseBytes: (after.HeapInuseBytes - before.HeapInuseBytes) / f,
		StackInuse:     (after.StackInuse - before.StackInuse) / f,
		Goroutines:     (after.Goroutines - before.Goroutines) / f,
	}
}

// SDSMetrics are the server's figures around the load.
type SDSMetrics struct {
	Before ServerSample `json:"before"`
	// Up is scraped as soon as every stream has its first secret; End just
	// before the streams close, after being held idle for the rest of the
	// duration.
	Up           ServerSample `json:"up"`
	End          ServerSample `json:"end"`
	PerStreamUp  PerStream    `json:"per_stream_up"`
	PerStreamEnd PerStream    `json:"per_stream_end"`
}

// PushResult is what the bundle push measured.
type PushResult struct {
	// PrepareCA is the admin call's own latency (key generation and the
	// store write included); every stream figure counts from its start.
	PrepareCA time.Duration `json:"prepare_ca_ns"`
	// Targets are the bundle streams that were up when the call was made;
	// Got how many of them received and ACKed a new bundle.
	Targets int `json:"targets"`
	Got     int `json:"got"`
	// Grew is how many of the new bundles held more certificates than the
	// stream's first one.
	Grew int `json:"grew"`
	// ToACK is from the PrepareCA call to the ACK of the new bundle having
	// been written.
	ToACK Latency `json:"to_ack"`
}

// LoopResult is what a connect loop measured.
type LoopResult struct {
	Clients    int `json:"clients"`
	Iterations int `json:"iterations"`
	// Unfinished iterations were still waiting for their first secret when
	// the duration ended (all of them, if the caller is entitled to none).
	Unfinished int     `json:"unfinished"`
	PerSecond  float64 `json:"per_second"`
	Latency    Latency `json:"connect_to_first_secret"`
}

// SDSResult is what an SDS load measured.
type SDSResult struct {
	Mode    string   `json:"mode"` // "streams" or "connect-loop"
	Streams int      `json:"streams,omitempty"`
	Conns   int      `json:"conns,omitempty"`
	Names   []string `json:"names,omitempty"`
	// Ready streams received their first secret; FirstSecret is the time
	// from opening each stream to that response.
	Ready       int           `json:"ready"`
	FirstSecret Latency       `json:"connect_to_first_secret"`
	RampElapsed time.Duration `json:"ramp_elapsed_ns"` // first open to last first secret
	// Pushes are responses after a stream's first; NACKs what the bench
	// rejected on purpose (NackEvery).
	Pushes     int64         `json:"pushes"`
	NACKs      int64         `json:"nacks"`
	Errors     int64         `json:"errors"`
	FirstError string        `json:"first_error,omitempty"`
	Elapsed    time.Duration `json:"elapsed_ns"`
	Metrics    *SDSMetrics   `json:"metrics,omitempty"`
	Push       *PushResult   `json:"push,omitempty"`
	Loop       *LoopResult   `json:"connect_loop,omitempty"`
}

// scrape reads the process figures from a Prometheus text exposition.
func scrape(ctx context.Context, url string) (ServerSample, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return ServerSample{}, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return ServerSample{}, fmt.Errorf("scrape %s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return ServerSample{}, fmt.Errorf("scrape %s: %s", url, resp.Status)
	}
	want := map[string]*float64{}
	var s ServerSample
	want["process_resident_memory_bytes"] = &s.RSSBytes
	want["go_memstats_heap_inuse_bytes"] = &s.HeapInuseBytes
	want["go_goroutines"] = &s.Goroutines
	want["go_memstats_stack_inuse_bytes"] = &s.StackInuse
	want["meshid_sds_streams"] = &s.SDSStreams
	found := 0
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		name, val, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			continue
		}
		if p, ok := want[name]; ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(val), 64)
			if err != nil {
				return s, fmt.Errorf("scrape %s: %s: %w", url, name, err)
			}
			*p = v
			found++
		}
	}
	if err := sc.Err(); err != nil {
		return s, fmt.Errorf("scrape %s: %w", url, err)
	}
	if found < 3 {
		return s, fmt.Errorf("scrape %s: process_resident_memory_bytes, go_goroutines or go_memstats_heap_inuse_bytes missing", url)
	}
	return s, nil
}
