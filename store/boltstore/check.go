package boltstore

import (
	"bytes"
	"fmt"

	bolt "go.etcd.io/bbolt"
)

// Check verifies the store: bbolt's own page-level consistency check, then
// that the inventory's two buckets are exact twins (every serial in svids
// points at an svids_by_expiry key holding that serial's record, and nothing
// else is in the index). It is what `kill -9` tests and operators run after
// a crash.
func (s *Store) Check() error {
	return wrapTxErr("check store", s.db.View(func(tx *bolt.Tx) error {
		// Drain every error: the checker goroutine blocks until its channel
		// is read to the end.
		var first error
		for err := range tx.Check() {
			if first == nil {
				first = err
			}
		}
		if first != nil {
			return fmt.Errorf("bbolt consistency: %w", first)
		}
		_, err := checkInventory(tx)
		return err
	}))
}

// checkInventory returns the number of inventory rows if the twins agree.
func checkInventory(tx *bolt.Tx) (int, error) {
	svids, idx := tx.Bucket(bucketSVIDs), tx.Bucket(bucketSVIDExpiry)
	n := 0
	err := svids.ForEach(func(serial, prefix []byte) error {
		if len(prefix) != expiryPrefixLen {
			return fmt.Errorf("inventory row %s: malformed index pointer %x", serial, prefix)
		}
		v := idx.Get(append(bytes.Clone(prefix), serial...))
		if v == nil {
			return fmt.Errorf("inventory row %s has no expiry index entry", serial)
		}
		row, err := decodeSVID(v)
		if err != nil {
			return fmt.Errorf("inventory row %s: %w", serial, err)
		}
		if row.Serial != string(serial) || !bytes.Equal(expiryKey(row.NotAfter, row.Serial)[:expiryPrefixLen], prefix) {
			return fmt.Errorf("inventory row %s: index entry holds serial %s expiring %s", serial, row.Serial, row.NotAfter)
		}
		n++
		return nil
	})
	if err != nil {
		return 0, err
	}
	if m := idx.Stats().KeyN; m != n {
		return 0, fmt.Errorf("expiry index has %d keys for %d inventory rows", m, n)
	}
	return n, nil
}
