"""The ground every other package stands on, with no ML library imported: errors, `${stage}` references,
shipped paths, hub lookups, library-config checking, run folders and the console output of runs."""
