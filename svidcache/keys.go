package svidcache

import "strings"

// Identities a caller holds directly (the SPIFFE ID of the certificate it
// authenticated with, or the one its join token names) are served from
// slots of their own, keyed "id:<spiffe id>" (shared by token callers) or
// "id:<spiffe id>#<serial>" (one per authenticating certificate, so that
// each renewal lineage stays apart and dies with its credential).

// DirectKey is the slot key of a directly held ID; serial is the
// authenticating certificate's (normalised) serial, or "" for a token.
func DirectKey(id, serial string) string {
	if serial == "" {
		return "id:" + id
	}
	return "id:" + id + "#" + serial
}

// IsDirect reports whether key is a DirectKey rather than an entry ID.
func IsDirect(key string) bool { return strings.HasPrefix(key, "id:") }

// DirectSerial is the authenticating serial in a DirectKey, if any.
func DirectSerial(key string) string {
	if !IsDirect(key) {
		return ""
	}
	_, serial, _ := strings.Cut(key, "#")
	return serial
}

// DirectKeyOf reports whether key is a DirectKey for id (with or without a
// serial).
func DirectKeyOf(key, id string) bool {
	return key == "id:"+id || strings.HasPrefix(key, "id:"+id+"#")
}
