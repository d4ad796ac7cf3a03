"""`imgtalk validate`: a dry run of a dub manifest. Every row is probed on Ray (the video,
the dubbed audio, a few frames through the face tracker) and checked against the security
policy; the problems a dub would hit are reported per row, with an estimate of what the
job would cost on the configured pools. Nothing is written except the report."""
