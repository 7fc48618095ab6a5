"""SQL migrations, applied in file-name order by ``canvasdb.db.migrate``.

A released file is never edited, and a number is never reused: 0021 was never released, so
databases go from 0020 to 0022."""
