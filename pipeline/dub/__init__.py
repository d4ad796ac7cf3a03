"""The dubbing job: manifest in, lip-synced videos and a Parquet report out (`imgtalk dub`)."""
