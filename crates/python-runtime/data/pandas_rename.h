/* pandas 3.0.6 vendors functions of numpy's datetime code under numpy's own names (one with
   another signature). Harmless between separate .so files, clashes in one static link:
   renamed where they are defined, the `pandas_datetime` module (force-included into its
   objects, see the data runtime's compiler wrappers); other modules reach them through the
   module's C API capsule, not by name. */
#ifndef PANDAS_RENAME_H
#define PANDAS_RENAME_H
#define is_leapyear pandas_vendored_is_leapyear
#define add_minutes_to_datetimestruct pandas_vendored_add_minutes_to_datetimestruct
#define get_datetimestruct_days pandas_vendored_get_datetimestruct_days
#define get_datetime_metadata_from_dtype pandas_vendored_get_datetime_metadata_from_dtype
#endif
