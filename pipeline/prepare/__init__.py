"""`imgtalk prepare`: a talking-head corpus -> training shards, video table and corpus card."""
