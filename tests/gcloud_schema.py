"""Parse a deploy file with gcloud's own loaders (run by gcloud's bundled Python, offline).

    python3 gcloud_schema.py SDK_ROOT cloudbuild|run|vertex FILE

Exit 0 when gcloud accepts the file as a Cloud Build config (what `gcloud builds submit
--config` loads), a Cloud Run service (what `gcloud run services replace` loads) or a Vertex AI
CustomJobSpec (what `gcloud ai custom-jobs create --config` loads): an unknown or misspelt
field, or a value of the wrong type, is an error naming it. tests/test_deploy.py runs it.
"""

import os
import sys


def main() -> None:
    sdk, kind, path = sys.argv[1:4]
    sys.path[:0] = [os.path.join(sdk, "lib"), os.path.join(sdk, "lib", "third_party")]
    from googlecloudsdk.api_lib.util import messages as messages_util
    from googlecloudsdk.core import yaml

    if kind == "cloudbuild":
        from googlecloudsdk.api_lib.cloudbuild import config
        from googlecloudsdk.generated_clients.apis.cloudbuild.v1 import cloudbuild_v1_messages

        build = config.LoadCloudbuildConfigFromPath(path, cloudbuild_v1_messages)
        print(f"{len(build.steps)} steps")
    elif kind == "run":
        from googlecloudsdk.generated_clients.apis.run.v1 import run_v1_messages

        service = messages_util.DictToMessageWithErrorCheck(
            yaml.load_path(path), run_v1_messages.Service
        )
        print(service.metadata.name)
    elif kind == "vertex":
        from googlecloudsdk.generated_clients.apis.aiplatform.v1 import aiplatform_v1_messages

        spec = messages_util.DictToMessageWithErrorCheck(
            yaml.load_path(path), aiplatform_v1_messages.GoogleCloudAiplatformV1CustomJobSpec
        )
        print(spec.workerPoolSpecs[0].machineSpec.machineType)
    else:
        sys.exit(f"unknown kind {kind}")


if __name__ == "__main__":
    main()
