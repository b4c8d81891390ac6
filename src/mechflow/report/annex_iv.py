"""The structure of the report: Annex IV of Regulation (EU) 2024/1689 (the AI Act), point by point.

``POINTS`` quotes each point's text from the Regulation (OJ L, 2024/1689, 12.7.2024; EU law is public
and may be quoted) and maps it to what fills it:

* ``provider``: keys of the provider file (`mechflow.contracts.report.ProviderFile`): what only the
  provider of the AI system can state. A missing key is printed as "To be completed by the provider".
* ``measured``: evidence blocks the pipeline measured (`mechflow.report.evidence`), each a group of
  numbers and figures read from the run's result files.

Nothing here states a verdict, a risk class or a list of standards: those come from the provider.
"""

from __future__ import annotations

from dataclasses import dataclass

REGULATION = "Regulation (EU) 2024/1689 (Artificial Intelligence Act), Article 11(1) and Annex IV"
ANNEX_INTRO = ("The technical documentation referred to in Article 11(1) shall contain at least the following "
               "information, as applicable to the relevant AI system:")


@dataclass(frozen=True)
class Point:
    id: str
    text: str
    provider: tuple[str, ...] = ()
    measured: tuple[str, ...] = ()


@dataclass(frozen=True)
class Section:
    number: int
    heading: str
    text: str
    points: tuple[Point, ...]


POINTS: tuple[Section, ...] = (
    Section(1, "General description of the AI system",
            "A general description of the AI system including:", (
                Point("1(a)", "its intended purpose, the name of the provider and the version of the system "
                      "reflecting its relation to previous versions;",
                      ("provider_name", "provider_contact", "system_name", "system_version", "intended_purpose",
                       "risk_classification"), ("model",)),
                Point("1(b)", "how the AI system interacts with, or can be used to interact with, hardware or "
                      "software, including with other AI systems, that are not part of the AI system itself, where "
                      "applicable;", ("interactions",)),
                Point("1(c)", "the versions of relevant software or firmware, and any requirements related to version "
                      "updates;", ("software_update_requirements",), ("software",)),
                Point("1(d)", "the description of all the forms in which the AI system is placed on the market or put "
                      "into service, such as software packages embedded into hardware, downloads, or APIs;",
                      ("forms_placed_on_market",)),
                Point("1(e)", "the description of the hardware on which the AI system is intended to run;",
                      ("hardware",), ("study_platform",)),
                Point("1(f)", "where the AI system is a component of products, photographs or illustrations showing "
                      "external features, the marking and internal layout of those products;",
                      ("product_illustrations",)),
                Point("1(g)", "a basic description of the user-interface provided to the deployer;",
                      ("user_interface",)),
                Point("1(h)", "instructions for use for the deployer, and a basic description of the user-interface "
                      "provided to the deployer, where applicable;", ("instructions_for_use",)),
            )),
    Section(2, "Detailed description of the elements of the AI system and of the process for its development",
            "A detailed description of the elements of the AI system and of the process for its development, "
            "including:", (
                Point("2(a)", "the methods and steps performed for the development of the AI system, including, "
                      "where relevant, recourse to pre-trained systems or tools provided by third parties and how "
                      "those were used, integrated or modified by the provider;",
                      ("development_methods",), ("pretrained", "study_method")),
                Point("2(b)", "the design specifications of the system, namely the general logic of the AI system and "
                      "of the algorithms; the key design choices including the rationale and assumptions made, "
                      "including with regard to persons or groups of persons in respect of who, the system is "
                      "intended to be used; the main classification choices; what the system is designed to optimise "
                      "for, and the relevance of the different parameters; the description of the expected output and "
                      "output quality of the system; the decisions about any possible trade-off made regarding the "
                      "technical solutions adopted to comply with the requirements set out in Chapter III, Section 2;",
                      ("design_specifications",), ("architecture",)),
                Point("2(c)", "the description of the system architecture explaining how software components build on "
                      "or feed into each other and integrate into the overall processing; the computational resources "
                      "used to develop, train, test and validate the AI system;",
                      ("system_architecture",), ("study_compute",)),
                Point("2(d)", "where relevant, the data requirements in terms of datasheets describing the training "
                      "methodologies and techniques and the training data sets used, including a general description "
                      "of these data sets, information about their provenance, scope and main characteristics; how the "
                      "data was obtained and selected; labelling procedures (e.g. for supervised learning), data "
                      "cleaning methodologies (e.g. outliers detection);",
                      ("training_data",), ("study_data",)),
                Point("2(e)", "assessment of the human oversight measures needed in accordance with Article 14, "
                      "including an assessment of the technical measures needed to facilitate the interpretation of "
                      "the outputs of AI systems by the deployers, in accordance with Article 13(3), point (d);",
                      ("human_oversight_measures",), ("interpretability", "dictionaries", "graphs", "steering")),
                Point("2(f)", "where applicable, a detailed description of pre-determined changes to the AI system and "
                      "its performance, together with all the relevant information related to the technical solutions "
                      "adopted to ensure continuous compliance of the AI system with the relevant requirements set out "
                      "in Chapter III, Section 2;", ("predetermined_changes",)),
                Point("2(g)", "the validation and testing procedures used, including information about the validation "
                      "and testing data used and their main characteristics; metrics used to measure accuracy, "
                      "robustness and compliance with other relevant requirements set out in Chapter III, Section 2, "
                      "as well as potentially discriminatory impacts; test logs and all test reports dated and signed "
                      "by the responsible persons, including with regard to pre-determined changes as referred to "
                      "under point (f);", ("test_sign_off",),
                      ("tasks", "circuits", "reference", "stats", "cross_model", "benchmark", "audit",
                       "test_log")),
                Point("2(h)", "cybersecurity measures put in place;", ("cybersecurity_measures",)),
            )),
    Section(3, "Monitoring, functioning and control of the AI system",
            "Detailed information about the monitoring, functioning and control of the AI system, in particular with "
            "regard to:", (
                Point("3", "its capabilities and limitations in performance, including the degrees of accuracy for "
                      "specific persons or groups of persons on which the system is intended to be used and the "
                      "overall expected level of accuracy in relation to its intended purpose; the foreseeable "
                      "unintended outcomes and sources of risks to health and safety, fundamental rights and "
                      "discrimination in view of the intended purpose of the AI system; the human oversight measures "
                      "needed in accordance with Article 14, including the technical measures put in place to "
                      "facilitate the interpretation of the outputs of AI systems by the deployers; specifications on "
                      "input data, as appropriate;",
                      ("accuracy_for_groups", "foreseeable_risks", "input_data_specifications"),
                      ("capabilities", "limitations")),
            )),
    Section(4, "Appropriateness of the performance metrics",
            "A description of the appropriateness of the performance metrics for the specific AI system;", (
                Point("4", "A description of the appropriateness of the performance metrics for the specific AI "
                      "system;", ("metrics_appropriateness",), ("metric_definitions",)),
            )),
    Section(5, "Risk-management system (Article 9)",
            "A detailed description of the risk management system in accordance with Article 9;", (
                Point("5", "A detailed description of the risk management system in accordance with Article 9;",
                      ("risk_management_system",), ("risk_inputs",)),
            )),
    Section(6, "Relevant changes over the lifecycle",
            "A description of relevant changes made by the provider to the system through its lifecycle;", (
                Point("6", "A description of relevant changes made by the provider to the system through its "
                      "lifecycle;", ("lifecycle_changes",), ("version_identity",)),
            )),
    Section(7, "Harmonised standards and other specifications applied",
            "A list of the harmonised standards applied in full or in part the references of which have been "
            "published in the Official Journal of the European Union; where no such harmonised standards have been "
            "applied, a detailed description of the solutions adopted to meet the requirements set out in Chapter "
            "III, Section 2, including a list of other relevant standards and technical specifications applied;", (
                Point("7", "A list of the harmonised standards applied in full or in part the references of which "
                      "have been published in the Official Journal of the European Union; where no such harmonised "
                      "standards have been applied, a detailed description of the solutions adopted to meet the "
                      "requirements set out in Chapter III, Section 2, including a list of other relevant standards "
                      "and technical specifications applied;", ("standards_applied", "standards_solutions")),
            )),
    Section(8, "EU declaration of conformity (Article 47)",
            "A copy of the EU declaration of conformity referred to in Article 47;", (
                Point("8", "A copy of the EU declaration of conformity referred to in Article 47;",
                      ("declaration_of_conformity",)),
            )),
    Section(9, "Post-market monitoring (Article 72)",
            "A detailed description of the system in place to evaluate the AI system performance in the post-market "
            "phase in accordance with Article 72, including the post-market monitoring plan referred to in Article "
            "72(3).", (
                Point("9", "A detailed description of the system in place to evaluate the AI system performance in "
                      "the post-market phase in accordance with Article 72, including the post-market monitoring plan "
                      "referred to in Article 72(3).", ("post_market_monitoring_plan",), ("rerun",)),
            )),
)


def provider_keys() -> list[str]:
    """Every provider-file key the Annex structure asks for, in order of first use."""
    seen: list[str] = []
    for section in POINTS:
        for point in section.points:
            seen += [k for k in point.provider if k not in seen]
    return seen
