package qcow2

// Budgets that bound what an untrusted image may cost us, checked by Open
// before the work they bound is done (see docs/qcow2.md, "Budgets").
const (
	// MinMetadataBudget is the metadata budget of a small image: Open loads
	// at most max(MinMetadataBudget, virtual size / 512) bytes of L2 tables,
	// and counts the L2 tables the L1 table names before reading any. The
	// divisor is what a fully allocated image with 4 KiB clusters needs, so
	// qemu's default 64 KiB clusters never come near it; an image with tiny
	// clusters and a large allocated area is refused instead of costing
	// memory out of proportion to the disk it describes.
	MinMetadataBudget = 64 << 20
	// MinDecompressBudget and MaxCompressionRatio bound the output of
	// compressed clusters: their count × the cluster size may be at most
	// max(MinDecompressBudget, MaxCompressionRatio × the distinct host bytes
	// their runs span). deflate cannot exceed about 1032:1 per cluster;
	// a file beyond the ratio is a decompression bomb.
	MinDecompressBudget = 64 << 20
	MaxCompressionRatio = 1024

	metadataBudgetDivisor = 512
)

// MetadataBudget is the most L2 table bytes Open loads for an image of
// virtualSize guest bytes.
func MetadataBudget(virtualSize int64) int64 {
	return max(MinMetadataBudget, virtualSize/metadataBudgetDivisor)
}

func decompressBudget(compressedBytes uint64) uint64 {
	return max(MinDecompressBudget, MaxCompressionRatio*compressedBytes)
}
