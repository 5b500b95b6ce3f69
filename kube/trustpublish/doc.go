// Package trustpublish publishes the server's trust bundle where Kubernetes
// workloads read trust anchors without an agent: as signer-linked
// ClusterTrustBundles (certificates.k8s.io/v1, one per CA, for the kubelet's
// clusterTrustBundle projection) and as a ConfigMap in every namespace (key
// ca.crt, like Istio's istio-ca-root-cert). Both are controllers in
// client-go's shape, like kube/bundlecm: informers on what they write, a
// rate-limited workqueue, an idempotent reconcile, so a bundle change and
// an edit or deletion by anyone else both end in the objects matching the
// bundle.
package trustpublish

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
)

// ManagedByLabel marks the objects meshid writes; only those it deletes.
const ManagedByLabel = "app.kubernetes.io/managed-by"

// ManagedBy is ManagedByLabel's value.
const ManagedBy = "meshid"

// TrustDomainLabel carries the trust domain whose CA a ClusterTrustBundle
// holds: pods select on it (labelSelector), and a server owns only the
// objects with its own trust domain, so two meshid servers of different
// trust domains can share a signer name.
const TrustDomainLabel = "meshid.io/trust-domain"

// ca is one CA certificate of the bundle.
type ca struct {
	der  []byte
	pem  string
	hash string // hex SHA-256 of the DER, truncated: the object's name suffix
}

// parseBundle splits a PEM bundle into its CA certificates, dropping
// duplicates (the API server rejects a CTB with two equal certificates).
func parseBundle(b []byte) ([]ca, error) {
	var out []ca
	seen := map[string]bool{}
	for len(b) > 0 {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("trust bundle: %w", err)
		}
		if !c.IsCA {
			return nil, fmt.Errorf("trust bundle: certificate %q is not a CA", c.Subject)
		}
		sum := sha256.Sum256(blk.Bytes)
		h := hex.EncodeToString(sum[:])
		if seen[h] {
			continue
		}
		seen[h] = true
		// Headers are rejected by the API server; re-encode without them.
		out = append(out, ca{der: blk.Bytes, pem: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: blk.Bytes})), hash: h[:16]})
	}
	return out, nil
}
