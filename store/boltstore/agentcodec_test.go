package boltstore

import (
	"reflect"
	"testing"
	"time"

	"github.com/meshid/meshid/store"
)

// A record written before node selectors existed (format 1) still reads,
// and one with selectors keeps them.
func TestAgentCodecVersions(t *testing.T) {
	t0 := time.Date(2026, 12, 2, 0, 0, 0, 0, time.UTC)
	r := store.AgentRecord{ID: "spiffe://td/meshid/agent/join/a", Method: "join_token", Node: "a", FirstSeen: t0, LastSeen: t0,
		NodeSVIDs: []store.AgentSVID{{Serial: "0a", NotAfter: t0.Add(time.Hour)}}}
	v1 := encodeAgent(&r)
	v1[0] = agentV1
	// Drop the (empty) selector count format 2 appends.
	v1 = v1[:len(v1)-1]
	got, err := decodeAgent(v1)
	if err != nil || !reflect.DeepEqual(got, r) {
		t.Fatalf("v1 record: got %+v, %v; want %+v", got, err, r)
	}
	r.Selectors = []string{"k8s_psat:cluster:c", "k8s_psat:node-uid:u"}
	got, err = decodeAgent(encodeAgent(&r))
	if err != nil || !reflect.DeepEqual(got, r) {
		t.Fatalf("v2 record: got %+v, %v; want %+v", got, err, r)
	}
}
