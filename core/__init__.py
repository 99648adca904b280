"""The basics every layer shares: errors said in one line, safe file writes, published output
folders, typed option declarations, and locations on disk or in object storage."""
