"""SQL migrations, applied in file-name order by ``canvasdb.db.migrate``."""
