"""The module's self-test (``MedKDSegment.py``'s ``MedKDSegmentTest`` runs it): for Slicer's Reload and Test,
``Slicer --python-code`` and pytest alike, on the real scene.

It builds its own tiny untrained models, so it checks plumbing (nodes, names, geometry, tables, layout, the
worker), not accuracy, and does not depend on the bundled models. A mixin for ``ScriptedLoadableModuleTest``
(``unittest``'s assertions, ``delayDisplay``), with the module's Logic class as ``logicClass``.
"""

from __future__ import annotations

import slicer


class SelfTest:
    logicClass: type  # the module's Logic, made with (userModelFolders=..., includeBundledModels=...)

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentCompareAndWorker()
        self.setUp()
        self.test_FineTune()
        self.setUp()
        self.test_TrainAndDistil()

    def _inTemporaryFolder(self, message, body):
        """Run ``body(logic, folder)`` with a logic that sees only a temporary models folder, then clean up."""
        import shutil
        import tempfile

        self.delayDisplay(message)
        folder = tempfile.mkdtemp(prefix="MedKDSegmentTest-")
        logic = self.logicClass(userModelFolders=[folder], includeBundledModels=False)
        try:
            body(logic, folder)
        finally:
            logic.shutdownWorker()
            shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("Test passed")

    def test_SegmentCompareAndWorker(self):
        self._inTemporaryFolder("Building tiny test models and a CT phantom", self._segmentCompareAndWorker)

    def _segmentCompareAndWorker(self, logic, folder):
        import numpy as np

        from MedKDSegmentLib.scene.comparison import LAYOUT_ID, table_rows
        from MedKDSegmentLib.scene.volumes import add_volume_node
        from MedKDSegmentLib.selftest import make_test_models, test_volume

        models = make_test_models(folder)
        volumeNode = add_volume_node(test_volume("CT"), "phantom CT")
        before = np.array(slicer.util.arrayFromVolume(volumeNode))
        self.assertEqual({m.name for m in logic.listModels()}, set(models.values()))
        self.assertEqual(logic.detectModality(volumeNode)[0], "CT")

        self.delayDisplay("Segmenting in-process")
        segmentationNode = logic.segment(volumeNode, model=models["student"], device="cpu")
        self.assertEqual(segmentationNode.GetName(), f"phantom CT - {models['student']}")
        segmentation = segmentationNode.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 8)
        self.assertEqual(segmentation.GetNthSegment(0).GetName(), "liver")
        labelmap = segmentation.GetNthSegment(0).GetRepresentation("Binary labelmap")
        self.assertEqual(labelmap.GetDimensions(), volumeNode.GetImageData().GetDimensions())
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(volumeNode), before)  # input untouched

        self.delayDisplay("Comparing teacher and student")
        result = logic.compare(volumeNode, teacher=models["teacher"], student=models["student"], device="cpu")
        rows = table_rows(result.structuresTable)
        self.assertEqual([row["Structure"] for row in rows][:2], ["liver", "spleen"])
        self.assertEqual(rows[-1]["Structure"], "mean")
        self.assertEqual(slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLLayoutNode").GetViewArrangement(), LAYOUT_ID)

        self.delayDisplay("Segmenting in the worker process")
        job = logic.startSegment(volumeNode, model=models["student"], device="cpu")
        workerNode = job.wait(timeout=600)
        self.assertEqual(workerNode.GetSegmentation().GetNumberOfSegments(), 8)

    def test_FineTune(self):
        self._inTemporaryFolder("Fine-tuning a tiny student on a segmentation", self._fineTune)

    def _fineTune(self, logic, folder):
        import numpy as np

        from MedKDSegmentLib.engine.phantom import generate_phantom
        from MedKDSegmentLib.scene.comparison import table_rows
        from MedKDSegmentLib.scene.segmentations import segmentation_from_labels
        from MedKDSegmentLib.scene.volumes import add_volume_node
        from MedKDSegmentLib.selftest import SEED, make_test_models

        student = make_test_models(folder)["student"]
        image, truth = generate_phantom("CT", SEED, size=(48, 40, 24), spacing=(6.0, 6.0, 6.0))
        volumeNode = add_volume_node(image, "annotated CT")
        labels = np.where(np.isin(truth.array, [1, 2]), truth.array, 0).astype(np.uint8)
        segmentationNode = segmentation_from_labels(labels, volumeNode, "my annotations", {1: "Liver", 2: "Spleen"})
        # Segment names are matched to the model's structures ignoring case; only these two are annotated.
        self.assertEqual(logic.matchSegments(segmentationNode, model=student).matched, {"Liver": 1, "Spleen": 2})

        report = logic.fineTune([(volumeNode, segmentationNode)], model=student, epochs=2, device="cpu",
                                settings={"steps_per_epoch": 2, "batch_size": 1, "patch_size": (16, 24, 24)})
        self.assertEqual(report.model.parent, student)
        self.assertEqual(report.lossTable.GetNumberOfRows(), 2)  # one row per epoch
        self.assertEqual(table_rows(report.diceTable)[-1]["Structure"], "mean")
        self.assertEqual([m.name for m in logic.listModelVersions(student)], [student, report.model.name])

        self.delayDisplay("Deleting the new version")
        logic.deleteModel(report.model.name)
        self.assertNotIn(report.model.name, [m.name for m in logic.listModels()])

    def test_TrainAndDistil(self):
        self._inTemporaryFolder("Distilling a tiny student with two methods from a folder of phantoms",
                                self._trainAndDistil)

    def _trainAndDistil(self, logic, folder):
        from pathlib import Path

        from MedKDSegmentLib.engine.phantom import write_phantom_dataset
        from MedKDSegmentLib.selftest import SEED, SPACING, STUDENT, make_test_models

        teacher = make_test_models(folder)["teacher"]
        data = Path(folder) / "data" / "ct"  # not a bundle: the model list ignores it
        write_phantom_dataset(data, "CT", 2, seed=SEED, size=(40, 40, 24), spacing=SPACING)
        self.assertIn("cwd", [method["name"] for method in logic.distillationMethods()])
        report = logic.distillStudent(data, teachers=[teacher], methods="kd+cwd:0.5", epochs=1, device="cpu",
                                      settings={"steps_per_epoch": 2, "batch_size": 1, "patch_size": (16, 24, 24),
                                                "architecture": STUDENT})
        self.assertEqual(report.methods, "kd:1+cwd:0.5")  # recorded in the new bundle
        self.assertEqual([t["name"] for t in report.teachers], [teacher])
        self.assertIn(report.model.name, [m.name for m in logic.listModels(role="student")])
        self.assertEqual(report.lossTable.GetNumberOfRows(), 1)  # one row per epoch
