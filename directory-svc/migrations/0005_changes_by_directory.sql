-- A Global Administrator's change stream reads its own directory's changes in order.
CREATE INDEX changes_by_directory ON changes (directory_id, seq);
