"""The `capsule` package under plain CPython: tasks are ordinary functions (for unit tests)."""

import unittest

import capsule
from capsule import task


@task(name="double", compute="LOW", ram="64MB", timeout="1s", max_retries=0, env_vars={"A": "b"})
def double(x):
    """Doubles x."""
    return 2 * x


@task
def plain():
    return "plain"


class HostSdkTest(unittest.TestCase):
    def test_tasks_are_callable_functions(self):
        self.assertEqual(double(21), 42)
        self.assertEqual(plain(), "plain")

    def test_metadata_is_kept(self):
        self.assertEqual(double.__name__, "double")
        self.assertEqual(double.__doc__, "Doubles x.")
        self.assertEqual(double.name, "double")
        self.assertEqual(double.options["ram"], "64MB")
        self.assertTrue({"double", "plain"} <= set(capsule.registered_tasks()))

    def test_unknown_options_are_refused_with_a_suggestion(self):
        with self.assertRaisesRegex(TypeError, "unknown option 'rma'; did you mean 'ram'"):
            task(rma="1GB")

    def test_duplicate_names_are_refused(self):
        with self.assertRaisesRegex(ValueError, "task name 'double' is used by both"):
            @task(name="double")
            def other():
                return None

    def test_spawn_map_and_gather_run_in_process(self):
        self.assertEqual(double.map([1, 2, 3]), [2, 4, 6])
        handles = [double.spawn(5), plain.spawn()]
        self.assertEqual(capsule.gather(*handles), [10, "plain"])

    def test_a_failing_spawn_raises_task_error_on_result(self):
        @task(name="broken")
        def broken():
            raise ValueError("nope")

        handle = broken.spawn()
        with self.assertRaises(capsule.TaskError) as caught:
            handle.result()
        self.assertEqual((caught.exception.type, caught.exception.exc_type), ("exception", "ValueError"))

    def test_an_empty_name_is_refused(self):
        # Other values are checked by `capsule build`, which reads them from the source.
        with self.assertRaises(TypeError):
            task(name="")


if __name__ == "__main__":
    unittest.main()
